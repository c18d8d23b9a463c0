"""The closed-form updates of ROME, MEMIT and AlphaEdit, checked exactly against their
defining properties on small random matrices (fp64)."""

import torch

from wise_edit.baselines.closed_form import (
    alphaedit_update,
    memit_update,
    null_space_projection,
    rome_update,
)

OUT, IN = 5, 8


def _moment(seed: int = 0, tokens: int = 40) -> torch.Tensor:
    """A second moment E[k k^T] of random keys, with a few directions barely used."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 1, IN, dtype=torch.float64)
    keys = torch.randn(tokens, IN, generator=gen, dtype=torch.float64) * scale
    return keys.t() @ keys / tokens


def _random(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rome_maps_the_key_to_the_value_with_a_rank_one_update():
    weight, key, value, moment = (
        _random(OUT, IN),
        _random(IN, seed=2),
        _random(OUT, seed=3),
        _moment(),
    )
    update = rome_update(key, value - weight @ key, moment)
    torch.testing.assert_close((weight + update) @ key, value, rtol=0, atol=1e-10)
    assert torch.linalg.matrix_rank(update).item() == 1
    # its one direction is u = C^-1 k*: a key orthogonal to u keeps its output
    u = torch.linalg.solve(moment, key)
    probe = _random(IN, seed=4)
    probe = probe - (probe @ u) / (u @ u) * u
    torch.testing.assert_close(
        update @ probe, torch.zeros(OUT, dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_rome_writes_at_another_key_along_the_mean_keys_direction():
    """The reference code's right vector: the direction stays u = C^-1 k* of the mean key
    k*, the scale maps the raw prompt's key k to W k + residual exactly."""
    weight, key, raw, value, moment = (
        _random(OUT, IN),
        _random(IN, seed=2),
        _random(IN, seed=5),
        _random(OUT, seed=3),
        _moment(),
    )
    update = rome_update(key, value - weight @ raw, moment, at=raw)
    torch.testing.assert_close((weight + update) @ raw, value, rtol=0, atol=1e-10)
    u = torch.linalg.solve(moment, key)
    torch.testing.assert_close(update, torch.outer(update @ u / (u @ u), u), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        rome_update(key, value, moment, at=key), rome_update(key, value, moment)
    )


def test_memit_solves_its_least_squares_problem():
    """min ||ΔW K - R||^2 + λ tr(ΔW C ΔW^T), solved directly by lstsq on the stacked system
    [K^T; sqrt(λ) L^T] X = [R^T; 0] with C = L L^T."""
    keys, residuals, moment, weight = (
        _random(IN, 3, seed=5),
        _random(OUT, 3, seed=6),
        _moment(),
        2.5,
    )
    update = memit_update(keys, residuals, moment, weight)
    chol = torch.linalg.cholesky(moment)
    system = torch.cat([keys.t(), weight**0.5 * chol.t()])  # (n + I, I)
    rhs = torch.cat([residuals.t(), torch.zeros(IN, OUT, dtype=torch.float64)])
    direct = torch.linalg.lstsq(system, rhs).solution.t()  # (O, I)
    torch.testing.assert_close(update, direct, rtol=1e-8, atol=1e-10)


def test_memit_without_preserved_keys_writes_the_residuals_exactly():
    keys, residuals = _random(IN, 3, seed=7), _random(OUT, 3, seed=8)
    update = memit_update(keys, residuals, _moment(), 1e-12)
    torch.testing.assert_close(update @ keys, residuals, rtol=0, atol=1e-6)


def test_the_projection_keeps_the_small_eigenvalues_directions_only():
    moment = _moment()
    values, vectors = torch.linalg.eigh(moment)
    threshold = float(values[3])  # keeps 3 directions
    p = null_space_projection(values, vectors, threshold)
    torch.testing.assert_close(p, p.t())
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-12)
    assert round(float(torch.trace(p))) == 3
    torch.testing.assert_close(
        p @ vectors[:, 3:], torch.zeros(IN, IN - 3, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged():
    moment = _moment()
    values, vectors = torch.linalg.eigh(moment)
    threshold = float(values[4])
    p = null_space_projection(values, vectors, threshold)
    preserved = vectors[:, 4:] @ _random(IN - 4, 6, seed=9)  # keys with P k0 = 0
    keys, residuals = _random(IN, 2, seed=10), _random(OUT, 2, seed=11)
    earlier = _random(IN, 3, seed=12)
    update = alphaedit_update(keys, residuals, p, earlier @ earlier.t(), 10.0)
    assert update.abs().max() > 1e-3  # it does edit
    torch.testing.assert_close(
        update @ preserved, torch.zeros(OUT, 6, dtype=torch.float64), rtol=0, atol=1e-12
    )
    # and it is the paper's closed form, R K^T P ((K K^T + K_p K_p^T) P + α I)^-1
    inner = (keys @ keys.t() + earlier @ earlier.t()) @ p + 10.0 * torch.eye(
        IN, dtype=torch.float64
    )
    torch.testing.assert_close(update, residuals @ keys.t() @ p @ torch.linalg.inv(inner))


def test_alphaedit_with_a_full_projection_and_no_ridge_is_the_least_squares_write():
    keys, residuals = _random(IN, 3, seed=13), _random(OUT, 3, seed=14)
    eye = torch.eye(IN, dtype=torch.float64)
    update = alphaedit_update(keys, residuals, eye, torch.zeros(IN, IN, dtype=torch.float64), 1e-9)
    torch.testing.assert_close(update @ keys, residuals, rtol=0, atol=1e-5)
