"""Exact, hand-computed tests for wise_edit.wise.merging."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch.testing import assert_close

from wise_edit.wise.merging import (
    MERGE_METHODS,
    dare,
    dare_drop,
    dare_ties,
    disjoint_mean,
    elect_sign,
    get_merge,
    linear,
    sign,
    slerp,
    ties,
    trim,
)

NAMES = ("linear", "slerp", "dare", "dare_ties", "ties", "sign")


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def sample_vectors() -> list[torch.Tensor]:
    return [
        t(4.0, -1.0, 0.5, 2.0, 0.0, -3.0),
        t(-3.0, 2.0, -0.5, -1.0, 1.0, 0.0),
        t(1.0, 0.0, 0.0, 0.25, -2.0, -1.0),
    ]


# ------------------------------------------------------------------------------ trim


def test_trim_keeps_top_magnitudes() -> None:
    out = trim(t(0.5, -3.0, 2.0, -0.1, 3.0, 1.0), 0.5)
    assert torch.equal(out, t(0.0, -3.0, 2.0, 0.0, 3.0, 0.0))


def test_trim_count_uses_ceil_without_float_noise() -> None:
    ten = torch.arange(1.0, 11.0)
    assert int((trim(ten, 0.3) != 0).sum()) == 3  # 0.3 * 10 is 3.0000000000000004
    six = torch.arange(1.0, 7.0)
    assert torch.equal(trim(six, 0.25), t(0.0, 0.0, 0.0, 0.0, 5.0, 6.0))  # ceil(1.5) = 2
    assert torch.equal(trim(six, 0.01), t(0.0, 0.0, 0.0, 0.0, 0.0, 6.0))  # at least one


def test_trim_ties_go_to_lower_index() -> None:
    assert torch.equal(trim(t(1.0, -1.0, 1.0, 0.5), 0.5), t(1.0, -1.0, 0.0, 0.0))


def test_trim_keeps_shape_and_density_one_copies() -> None:
    matrix = t(1.0, -4.0, 2.0, 3.0).reshape(2, 2)
    assert torch.equal(trim(matrix, 0.5), t(0.0, -4.0, 0.0, 3.0).reshape(2, 2))
    copy = trim(matrix, 1.0)
    assert torch.equal(copy, matrix)
    assert copy.data_ptr() != matrix.data_ptr()


# ------------------------------------------------------------------------ elect_sign


def test_elect_sign_uses_weighted_mass() -> None:
    stacked = torch.stack([t(2.0, -2.0, 3.0, 0.0, 1.0), t(-1.0, 3.0, -1.0, 0.0, -2.0)])
    assert torch.equal(elect_sign(stacked, [1.0, 0.5]), t(1.0, -1.0, 1.0, 0.0, 0.0))
    assert torch.equal(elect_sign(stacked, [1.0, 1.0]), t(1.0, 1.0, 1.0, 0.0, -1.0))


# --------------------------------------------------------------------- disjoint_mean


def test_disjoint_mean_with_disagreeing_signs_and_zero_entry() -> None:
    stacked = torch.stack(
        [t(2.0, -1.0, 4.0, 0.0, 3.0), t(1.0, 3.0, -2.0, 0.0, 0.0), t(-6.0, 1.0, 0.0, 0.0, 0.0)]
    )
    weights = [1.0, 1.0, 1.0]
    signs = elect_sign(stacked, weights)
    assert torch.equal(signs, t(-1.0, 1.0, 1.0, 0.0, 1.0))
    assert torch.equal(disjoint_mean(stacked, weights, signs), t(-6.0, 2.0, 4.0, 0.0, 3.0))


def test_disjoint_mean_normalises_by_agreeing_weights() -> None:
    stacked = torch.stack([t(2.0, 4.0, 5.0), t(6.0, -1.0, 7.0)])
    # (3*2 + 1*6) / 4 = 3; 3*4 / 3 = 4; sign 0 means no agreement -> 0.
    out = disjoint_mean(stacked, [3.0, 1.0], t(1.0, 1.0, 0.0))
    assert torch.equal(out, t(3.0, 4.0, 0.0))


# -------------------------------------------------------------------- ties and sign


def test_ties_disjoint_support_is_not_diluted() -> None:
    a, b = t(1.0, 0.0, 2.0, 0.0), t(0.0, 3.0, 0.0, -4.0)
    assert torch.equal(ties([a, b], [1.0, 1.0]), t(1.0, 3.0, 2.0, -4.0))
    assert torch.equal(ties([a, b], [0.5, 0.5]), t(1.0, 3.0, 2.0, -4.0))


def test_linear_halves_disjoint_entries() -> None:
    a, b = t(1.0, 0.0, 2.0, 0.0), t(0.0, 3.0, 0.0, -4.0)
    assert torch.equal(linear([a, b], [0.5, 0.5]), t(0.5, 1.5, 1.0, -2.0))


def test_ties_conflict_keeps_majority_mass_sign_mean() -> None:
    # Entry 0: two shards say -1 but the +5 carries more mass, so only +5 survives.
    vectors = [t(5.0, 1.0, 0.0, 0.0), t(-1.0, 0.0, 2.0, 0.0), t(-1.0, 0.0, 0.0, -2.0)]
    assert torch.equal(ties(vectors, [1.0, 1.0, 1.0]), t(5.0, 1.0, 2.0, -2.0))
    # Entry 0: +3 and +1 agree against -1 -> mean (3 + 1) / 2 = 2.
    vectors = [t(3.0, 1.0, 0.0, 0.0), t(-1.0, 0.0, 2.0, 0.0), t(1.0, 0.0, 0.0, -2.0)]
    assert torch.equal(ties(vectors, [1.0, 1.0, 1.0]), t(2.0, 1.0, 2.0, -2.0))


def test_ties_trims_before_electing() -> None:
    # Trim to 2 of 4: [4, 0, 0, 2] and [-3, 2, 0, 0]; signs +, +, 0, +.
    vectors = [t(4.0, -1.0, 0.5, 2.0), t(-3.0, 2.0, -0.5, -1.0)]
    assert torch.equal(ties(vectors, [1.0, 1.0], density=0.5), t(4.0, 2.0, 0.0, 2.0))


def test_sign_equals_ties_with_density_one() -> None:
    vectors, weights = sample_vectors(), [0.5, 1.0, 2.0]
    assert torch.equal(sign(vectors, weights), ties(vectors, weights, density=1.0))
    # sign never trims, whatever density says.
    assert torch.equal(sign(vectors, weights, density=0.2), sign(vectors, weights))


# -------------------------------------------------------------------------- slerp


def test_slerp_orthogonal_unit_vectors_midpoint() -> None:
    e1, e2 = t(1.0, 0.0, 0.0, 0.0), t(0.0, 1.0, 0.0, 0.0)
    half = 1.0 / math.sqrt(2.0)
    assert_close(slerp([e1, e2], [1.0, 1.0]), t(half, half, 0.0, 0.0))
    # t = w2 / (w1 + w2) = 1/3 -> angle pi/6 from e1.
    third = math.pi / 6.0
    assert_close(slerp([e1, e2], [2.0, 1.0]), t(math.cos(third), math.sin(third), 0.0, 0.0))


def test_slerp_interpolates_magnitude_of_original_vectors() -> None:
    out = slerp([t(2.0, 0.0, 0.0, 0.0), t(0.0, 4.0, 0.0, 0.0)], [1.0, 1.0])
    half = 1.0 / math.sqrt(2.0)
    assert_close(out, t(2.0 * half, 4.0 * half, 0.0, 0.0))


def test_slerp_colinear_and_zero_fall_back_to_lerp() -> None:
    a, b = t(1.0, 2.0, 0.0, 0.0), t(2.0, 4.0, 0.0, 0.0)
    assert_close(slerp([a, b], [1.0, 1.0]), t(1.5, 3.0, 0.0, 0.0))
    assert_close(slerp([a, -a], [3.0, 1.0]), t(0.5, 1.0, 0.0, 0.0))
    zero = torch.zeros(4)
    assert_close(slerp([zero, b], [1.0, 3.0]), t(1.5, 3.0, 0.0, 0.0))


def test_slerp_folds_left_over_three_vectors() -> None:
    e1, e2, e3 = torch.eye(3)
    half = 1.0 / math.sqrt(2.0)
    mid = t(half, half, 0.0)
    # Second step: running = mid, t = 1/3 -> angle pi/6 from mid towards e3.
    expected = math.cos(math.pi / 6.0) * mid + math.sin(math.pi / 6.0) * e3
    assert_close(slerp([e1, e2, e3], [1.0, 1.0, 1.0]), expected)


def test_slerp_single_vector_and_matrix_shape() -> None:
    assert torch.equal(slerp([t(1.0, -2.0)], [0.3]), t(1.0, -2.0))
    m1, m2 = t(1.0, 0.0, 0.0, 0.0).reshape(2, 2), t(0.0, 0.0, 0.0, 1.0).reshape(2, 2)
    half = 1.0 / math.sqrt(2.0)
    assert_close(slerp([m1, m2], [1.0, 1.0]), t(half, 0.0, 0.0, half).reshape(2, 2))


def test_slerp_rejects_zero_partial_weight_sum() -> None:
    with pytest.raises(ValueError, match="partial weight sums"):
        slerp([t(1.0, 0.0), t(0.0, 1.0)], [1.0, -1.0])


# --------------------------------------------------------------------------- dare


def test_dare_density_one_equals_linear() -> None:
    vectors, weights = sample_vectors(), [0.5, 1.0, 2.0]
    assert torch.equal(dare(vectors, weights, density=1.0), linear(vectors, weights))


def test_dare_drop_keeps_share_and_rescales_exactly() -> None:
    vector = torch.arange(1.0, 2001.0)
    out = dare_drop(vector, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    assert 500 <= int(kept.sum()) <= 700  # ~0.3 * 2000 = 600
    assert torch.equal(out[kept], vector[kept] / 0.3)
    again = dare_drop(vector, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_dare_merge_with_seeded_generator() -> None:
    vector = torch.arange(1.0, 1001.0)
    out = dare([vector], [1.0], density=0.5, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert 400 <= int(kept.sum()) <= 600
    assert torch.equal(out[kept], vector[kept] * 2.0)
    assert torch.equal(out[~kept], torch.zeros(int((~kept).sum())))


def test_dare_ties_density_one_equals_sign() -> None:
    vectors, weights = sample_vectors(), [0.5, 1.0, 2.0]
    assert torch.equal(dare_ties(vectors, weights, density=1.0), sign(vectors, weights))


# ------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", NAMES)
def test_inputs_not_modified(name: str) -> None:
    vectors, weights = sample_vectors(), [0.5, 1.0, 2.0]
    originals = [v.clone() for v in vectors]
    out = MERGE_METHODS[name](
        vectors, weights, density=0.5, generator=torch.Generator().manual_seed(0)
    )
    out.add_(1.0)  # the result must not alias any input either
    for vector, original in zip(vectors, originals, strict=True):
        assert torch.equal(vector, original)
    assert weights == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("name", NAMES)
def test_dtype_preserved_for_float16(name: str) -> None:
    vectors = [v.to(torch.float16) for v in sample_vectors()]
    out = MERGE_METHODS[name](
        vectors, [1.0, 1.0, 1.0], density=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert out.dtype == torch.float16
    assert out.shape == vectors[0].shape


def test_float16_values_match_float32() -> None:
    a, b = t(1.0, 0.0, 2.0, 0.0), t(0.0, 3.0, 0.0, -4.0)
    out = ties([a.half(), b.half()], [0.5, 0.5])
    assert torch.equal(out, t(1.0, 3.0, 2.0, -4.0, dtype=torch.float16))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_shares_signature_and_runs(name: str) -> None:
    fn = get_merge(name)
    assert fn is MERGE_METHODS[name]
    params = inspect.signature(fn).parameters
    assert list(params) == ["vectors", "weights", "density", "generator"]
    assert params["density"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["density"].default == 1.0
    assert params["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["generator"].default is None
    vectors = [v.reshape(2, 3) for v in sample_vectors()]
    out = fn(vectors, [0.5, 1.0, 2.0], density=0.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


def test_merge_methods_is_complete_and_immutable() -> None:
    assert set(MERGE_METHODS) == set(NAMES)
    with pytest.raises(TypeError):
        MERGE_METHODS["mean"] = linear  # type: ignore[index]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", NAMES)
def test_empty_vector_list_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="at least one vector"):
        MERGE_METHODS[name]([], [])


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="same shape"):
        MERGE_METHODS[name]([torch.ones(4), torch.ones(5)], [1.0, 1.0])


@pytest.mark.parametrize("name", NAMES)
def test_weights_length_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="one weight per vector"):
        MERGE_METHODS[name]([torch.ones(4), torch.ones(4)], [1.0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("density", [0.0, 1.5, -0.5, float("nan")])
def test_bad_density_rejected(name: str, density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        MERGE_METHODS[name]([torch.ones(4), torch.ones(4)], [1.0, 1.0], density=density)


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_building_blocks_reject_bad_density(density: float) -> None:
    with pytest.raises(ValueError, match="density"):
        trim(torch.ones(4), density)
    with pytest.raises(ValueError, match="density"):
        dare_drop(torch.ones(4), density)


def test_building_blocks_reject_bad_shapes() -> None:
    stacked = torch.ones(2, 3)
    with pytest.raises(ValueError, match="one weight per vector"):
        elect_sign(stacked, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="signs must have shape"):
        disjoint_mean(stacked, [1.0, 1.0], torch.ones(2))


def test_get_merge_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown merge method 'mean'") as info:
        get_merge("mean")
    for name in NAMES:
        assert name in str(info.value)
