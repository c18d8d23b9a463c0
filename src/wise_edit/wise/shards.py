"""Knowledge sharding and merging (§2.3, Eqs. 7-8): random gradient masks that give each
shard of a side memory its own subspace, the update rules that move the memory only
inside its shard, and the merge of a full group of shards into the memory (the merge
functions themselves, TIES and the others of Table 11, are in `merging.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import SideMemory
from .merging import MergeFn


def random_masks(
    shape: torch.Size | tuple[int, ...], ratio: float, count: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """``count`` independent Bernoulli(ratio) boolean masks. Two of them overlap in about
    ratio**2 of the entries (Theorem 2.1), the anchors that TIES merging relies on."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return [torch.ones(shape, dtype=torch.bool) for _ in range(count)]
    return [torch.rand(shape, generator=generator) < ratio for _ in range(count)]


def masked_step(
    delta: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, lr: float
) -> torch.Tensor:
    """One SGD step that leaves entries outside ``mask`` exactly where they are."""
    return delta - lr * grad * mask


def clamp_to_bound(
    step: torch.Tensor, base_delta: torch.Tensor, bound: float | None
) -> torch.Tensor:
    """Keep ``base_delta + step`` within +-bound elementwise (W' within bound of W)."""
    if bound is None:
        return step
    return torch.clamp(step, min=-bound - base_delta, max=bound - base_delta)


@dataclass
class AdamMoments:
    """Adam's running moments of one edit's gradient (they live as long as the edit)."""

    first: torch.Tensor
    second: torch.Tensor
    steps: int = 0


def adam_direction(
    moments: AdamMoments | None,
    grad: torch.Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[torch.Tensor, AdamMoments]:
    """Adam's bias-corrected step direction m / (sqrt(v) + eps) for ``grad``, and the
    updated moments. Fed to `masked_step` in place of the gradient, so entries outside
    the shard still never move. Per-entry scaling is what makes it fast here: the margin
    and LM losses pull the side memory at very different rates, and plain SGD's step is
    set by the largest of them."""
    b1, b2 = betas
    if moments is None:
        moments = AdamMoments(torch.zeros_like(grad), torch.zeros_like(grad))
    first = b1 * moments.first + (1 - b1) * grad
    second = b2 * moments.second + (1 - b2) * grad * grad
    steps = moments.steps + 1
    direction = (first / (1 - b1**steps)) / ((second / (1 - b2**steps)).sqrt() + eps)
    return direction, AdamMoments(first, second, steps)


def merge_group(
    memory: SideMemory,
    merge_fn: MergeFn,
    *,
    density: float,
    generator: torch.Generator,
    norm_bound: float | None,
    close: bool,
) -> None:
    """Eq. 8 for ``memory``, whose group of shards is full: W_v' <- W_v + Merge(shard
    task vectors), on top of earlier groups' merges, within +-``norm_bound`` of W_v.
    ``close``: the memory takes no further edits (retrieve mode)."""
    vectors = [memory.shard_vector(i) for i in range(memory.shard_count)]
    earlier = memory.delta - torch.stack(vectors).sum(0)
    weights = [1.0 / len(vectors)] * len(vectors)
    merged = merge_fn(vectors, weights, density=density, generator=generator)
    total = earlier + merged.to(earlier.device)
    if norm_bound is not None:
        total = total.clamp(-norm_bound, norm_bound)
    memory.replace_delta(total, close)
