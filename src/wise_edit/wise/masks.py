"""Knowledge sharding (Eq. 7): random gradient masks that give each shard its own subspace."""

from __future__ import annotations

import torch


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


def heavy_ball(velocity: torch.Tensor | None, grad: torch.Tensor, momentum: float) -> torch.Tensor:
    """The next velocity ``momentum * velocity + grad`` (``grad`` on the first step). Fed
    to `masked_step` in place of the gradient; masking happens there, so entries outside
    the shard still never move."""
    return grad if velocity is None else momentum * velocity + grad


def clamp_to_bound(
    step: torch.Tensor, base_delta: torch.Tensor, bound: float | None
) -> torch.Tensor:
    """Keep ``base_delta + step`` within +-bound elementwise (W' within bound of W)."""
    if bound is None:
        return step
    return torch.clamp(step, min=-bound - base_delta, max=bound - base_delta)
