"""Compact side memories: each edit trained as a rank-r product ``up @ down`` and kept
in that form (`memory.py` stores the products, `router.Factors` applies them).

Why a product and not a dense delta compressed afterwards: Adam's per-entry scaling
spreads a dense edit over the whole matrix, so its SVD needs most of its singular values
to keep its answers. Trained as a product from the start, an edit has nowhere else to
go. ``down`` starts on the edit's own input directions (its tokens' value-matrix inputs),
``up`` at zero, so the first step already moves the outputs of the edit's tokens and
barely those of inputs far from them.
"""

from __future__ import annotations

import torch

from .router import Factors


def initial_factors(
    token_acts: torch.Tensor, out_dim: int, rank: int, centre: torch.Tensor | None = None
) -> Factors:
    """The start of an edit's product: ``down`` (r, I) the top ``rank`` right singular
    vectors of its tokens' inputs ``token_acts`` (n, I) less ``centre`` (I,), the mean
    input of unrelated text (random rows beyond the tokens' rank), and ``up`` (O, r)
    zeros, so the product starts at zero. Without the centre the top directions are the
    ones every input shares, and unrelated prompts would score as high as the edit's.
    Rows have norm sqrt(I / r): an Adam step of ``up`` then moves the edit's outputs about
    as far as an Adam step of a dense delta does, so the same learning rate fits both."""
    acts = token_acts.float()
    if centre is not None:
        acts = acts - centre.float()
    _, _, vh = torch.linalg.svd(acts, full_matrices=False)
    down = vh[:rank]
    if len(down) < rank:  # fewer independent tokens than the rank
        gen = torch.Generator(device="cpu").manual_seed(len(acts))
        extra = torch.randn(rank - len(down), acts.shape[1], generator=gen).to(acts)
        down = torch.cat([down, extra / extra.norm(dim=1, keepdim=True)])
    up = torch.zeros(out_dim, rank, device=acts.device)
    return Factors(up, (down * (acts.shape[1] / rank) ** 0.5).contiguous())


def bounded_scale(base: torch.Tensor, step: torch.Tensor, bound: float | None) -> float:
    """The largest s in [0, 1] with ``base + s * step`` within +-``bound`` elementwise
    (``base`` within it already): the norm bound of a dense memory, kept by a product by
    shortening its step rather than clamping entries it does not have."""
    if bound is None:
        return 1.0
    moving = step != 0
    if not bool(moving.any()):
        return 1.0
    room = bound - base[moving] * step[moving].sign()  # distance to the bound it moves toward
    return float(torch.clamp(room / step[moving].abs(), max=1.0).min().clamp(min=0.0))
