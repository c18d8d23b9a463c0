"""Merge WISE side-memory shards (task vectors) into one delta.

WISE trains k shards of its side memory, each under a random mask, so every task vector
``tau_i = W_i' - W`` is mostly sparse and the shards overlap only in part. The paper's
Table 11 compares six merges with MergeKit semantics; they live here as pure functions with
one shared signature so that a config can pick one by name (:func:`get_merge`).

Every merge computes in float32, because summing many half-precision shards loses the
small updates that edits consist of, and returns the dtype of its first input. Inputs are
never modified. Merges that do not use ``density`` or ``generator`` still validate and
accept them, so that callers can treat all six alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Protocol

import torch

__all__ = [
    "MERGE_METHODS",
    "MergeFn",
    "dare",
    "dare_drop",
    "dare_ties",
    "disjoint_mean",
    "elect_sign",
    "get_merge",
    "linear",
    "sign",
    "slerp",
    "ties",
    "trim",
]

# MergeKit switches from slerp to lerp above this |cos(angle)|: the angle is then too
# small for sin(theta) in the denominator to be numerically safe.
_COLINEAR = 0.9995
# Norms and weight sums at or below this count as zero.
_EPS = 1e-8


class MergeFn(Protocol):
    """The signature shared by all six merges, so that they are interchangeable."""

    def __call__(
        self,
        vectors: Sequence[torch.Tensor],
        weights: Sequence[float],
        *,
        density: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------- validation


def _check_density(density: float) -> None:
    """Reject densities outside (0, 1]; NaN fails the comparison and is rejected too."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must satisfy 0 < density <= 1, got {density!r}")


def _prepare(
    vectors: Sequence[torch.Tensor], weights: Sequence[float], density: float
) -> tuple[torch.Tensor, torch.dtype]:
    """Validate the shared arguments; stack float32 copies so no input is ever aliased."""
    if len(vectors) == 0:
        raise ValueError("need at least one vector to merge, got none")
    shape = vectors[0].shape
    for i, vector in enumerate(vectors):
        if vector.shape != shape:
            raise ValueError(
                f"all vectors must have the same shape: vector 0 has {tuple(shape)}, "
                f"vector {i} has {tuple(vector.shape)}"
            )
    if len(weights) != len(vectors):
        raise ValueError(
            f"need one weight per vector: got {len(weights)} weights for {len(vectors)} vectors"
        )
    _check_density(density)
    stacked = torch.stack([vector.to(torch.float32) for vector in vectors])
    return stacked, vectors[0].dtype


def _weight_column(weights: Sequence[float] | torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """Weights shaped (k, 1, ..., 1) so that they broadcast over a (k, ...) stack."""
    if stacked.dim() == 0:
        raise ValueError("stacked must have a leading vector dimension, got a 0-d tensor")
    column = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    if column.shape != (stacked.shape[0],):
        raise ValueError(
            f"need one weight per vector: got weights of shape "
            f"{tuple(column.shape)} for {stacked.shape[0]} vectors"
        )
    return column.reshape(-1, *([1] * (stacked.dim() - 1)))


def _weighted_sum(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i * tau_i over the leading dimension."""
    return (_weight_column(weights, stacked) * stacked).sum(dim=0)


def _sign_merge(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """TIES steps 2 and 3: elect a sign per entry, then average only the agreeing shards."""
    return disjoint_mean(stacked, weights, elect_sign(stacked, weights))


# ------------------------------------------------------------------------ building blocks


def trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * numel)`` largest-magnitude entries and zero the rest.

    TIES trims because small entries are mostly noise that would only add sign conflicts.
    ``ceil`` (not ``round``) is used so that any density > 0 keeps at least one entry of a
    non-empty vector; ``density * numel`` is first rounded to 9 decimals so that float noise
    (0.3 * 10 == 3.0000000000000004) does not keep an extra entry. Ties among equal
    magnitudes go to the lower flat index (stable sort). Returns a new tensor of the input
    dtype; density 1 returns an unchanged copy.
    """
    _check_density(density)
    flat = vector.flatten()
    keep = max(1, math.ceil(round(density * flat.numel(), 9)))
    if keep >= flat.numel():
        return vector.clone()
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:keep]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(vector.shape)


def elect_sign(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Per-entry sign of ``sum_i w_i * tau_i`` (MergeKit's "sum" consensus).

    Electing by mass rather than by count lets one large update outvote several small ones.
    Where the weighted sum is exactly 0 the result is 0, meaning "no agreement": unlike
    MergeKit (which picks +1 there), :func:`disjoint_mean` then yields 0 for that entry.
    ``stacked`` has shape (k, ...); the result has shape ``stacked.shape[1:]``.
    """
    return torch.sign(_weighted_sum(stacked, weights))


def disjoint_mean(
    stacked: torch.Tensor, weights: Sequence[float], signs: torch.Tensor
) -> torch.Tensor:
    """Per entry, ``sum(w_i * tau_i) / sum(w_i)`` over the shards that agree with ``signs``.

    A shard agrees on an entry when its weighted value ``w_i * tau_i`` is nonzero and has
    the elected sign (for non-negative weights: when ``tau_i`` does), as in MergeKit. Entries
    no shard qualifies for (including all sign-0 entries) are 0. Normalising by the weights
    of the agreeing shards only is the point: an entry that a single shard touched keeps its
    full value, whereas ``linear`` with w_i = 1/k would shrink it k-fold.
    """
    column = _weight_column(weights, stacked)
    if signs.shape != stacked.shape[1:]:
        raise ValueError(
            f"signs must have shape {tuple(stacked.shape[1:])}, got {tuple(signs.shape)}"
        )
    weighted = column * stacked
    agree = (weighted != 0) & (torch.sign(weighted) == signs)
    numerator = torch.where(agree, weighted, 0.0).sum(dim=0)
    denominator = torch.where(agree, column.expand_as(stacked), 0.0).sum(dim=0)
    defined = denominator.abs() > _EPS
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), 0.0)


def dare_drop(
    vector: torch.Tensor, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the kept ones by 1/density.

    DARE's rescaling keeps the expected value of every entry unchanged, so dropping most of
    a delta barely moves the merged model. ``generator`` (on the vector's device) makes the
    drop reproducible; None uses torch's global RNG. Density 1 returns an unchanged copy
    without drawing random numbers. Computes in the input dtype.
    """
    _check_density(density)
    if density == 1.0:
        return vector.clone()
    keep = torch.rand(vector.shape, generator=generator, device=vector.device) < density
    return torch.where(keep, vector / density, torch.zeros_like(vector))


def _slerp_pair(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """MergeKit's slerp of two flat vectors: angle from normalised copies, sin weights
    applied to the original vectors, so magnitudes are interpolated as well. Falls back to
    lerp when the angle is ill-defined (a ~zero vector) or too small/large to divide by.
    """
    norm0, norm1 = v0.norm(), v1.norm()
    if norm0 <= _EPS or norm1 <= _EPS:
        return (1.0 - t) * v0 + t * v1
    dot = torch.dot(v0 / norm0, v1 / norm1).clamp(-1.0, 1.0)
    if dot.abs() > _COLINEAR:
        return (1.0 - t) * v0 + t * v1
    theta = torch.arccos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1.0 - t) * theta) / sin_theta) * v0 + (torch.sin(t * theta) / sin_theta) * v1


# --------------------------------------------------------------------------------- merges


def linear(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sum_i w_i * tau_i``: the baseline. With w_i = 1/k it dilutes every update that only
    one shard made, which is why it trails TIES/Sign in WISE's Table 11. Ignores
    ``density`` and ``generator``.
    """
    stacked, dtype = _prepare(vectors, weights, density)
    return _weighted_sum(stacked, weights).to(dtype)


def slerp(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Spherical interpolation of the flattened vectors, which, unlike a weighted average of
    non-parallel vectors, does not shrink the norm.

    Two vectors use t = w2 / (w1 + w2). More vectors fold left:
    ``running = slerp(running, tau_i, t = w_i / (w_1 + ... + w_i))``. Only the weight ratios
    matter (a single vector is returned unscaled), so every partial sum must be nonzero.
    Ignores ``density`` and ``generator``.
    """
    stacked, dtype = _prepare(vectors, weights, density)
    count = stacked.shape[0]
    flat = stacked.reshape(count, stacked[0].numel())
    running, total = flat[0], float(weights[0])
    for i in range(1, count):
        total += float(weights[i])
        if abs(total) <= _EPS:
            raise ValueError(
                f"slerp needs nonzero partial weight sums, but w_1 + ... + w_{i + 1} = {total}"
            )
        running = _slerp_pair(running, flat[i], float(weights[i]) / total)
    return running.reshape(stacked.shape[1:]).to(dtype)


def dare(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE (linear): randomly drop and rescale each vector (:func:`dare_drop`), then sum
    with weights. Draws from ``generator`` vector by vector, in order.
    """
    stacked, dtype = _prepare(vectors, weights, density)
    dropped = torch.stack([dare_drop(vector, density, generator) for vector in stacked])
    return _weighted_sum(dropped, weights).to(dtype)


def ties(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIES: :func:`trim` each vector to ``density``, :func:`elect_sign`, then
    :func:`disjoint_mean`, so that conflicting signs do not cancel and disjoint updates are
    not diluted. Deterministic: ignores ``generator``.
    """
    stacked, dtype = _prepare(vectors, weights, density)
    trimmed = torch.stack([trim(vector, density) for vector in stacked])
    return _sign_merge(trimmed, weights).to(dtype)


def dare_ties(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE-TIES: TIES with DARE's random drop-and-rescale in place of magnitude trimming."""
    stacked, dtype = _prepare(vectors, weights, density)
    dropped = torch.stack([dare_drop(vector, density, generator) for vector in stacked])
    return _sign_merge(dropped, weights).to(dtype)


def sign(
    vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIES without trimming (the paper's ablation): sign election and disjoint mean only.
    Ignores ``density`` (after validating it) and ``generator``.
    """
    stacked, dtype = _prepare(vectors, weights, density)
    return _sign_merge(stacked, weights).to(dtype)


MERGE_METHODS: Mapping[str, MergeFn] = MappingProxyType(
    {
        "linear": linear,
        "slerp": slerp,
        "dare": dare,
        "dare_ties": dare_ties,
        "ties": ties,
        "sign": sign,
    }
)


def get_merge(name: str) -> MergeFn:
    """Look up a merge by its config name, failing loudly on typos."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        valid = ", ".join(sorted(MERGE_METHODS))
        raise ValueError(f"unknown merge method {name!r}; valid names: {valid}") from None
