"""MEND's editor network (Mitchell et al. 2022, "Fast Model Editing at Scale", Sec. 3.1).

The gradient of a loss with respect to a linear layer's weight is a sum of rank-one
terms, one per token: dL/dW = sum_t delta_t u_t^T, with u_t the layer's input at token t
and delta_t the gradient of the loss with respect to its output there. MEND
never forms that (out x in) matrix to transform it; a small network maps each token's
pair (u_t, delta_t) to (u~_t, delta~_t) and the edit is

    W~ = W - alpha * sum_t delta~_t u~_t^T           (Sec. 3.1)

with a learned step alpha per edited layer. The network follows the reference code
(eric-mitchell/mend): ``config/alg/mend.yaml`` (combine: True, n_hidden: 1, init: id,
norm: True, rank: 1920, mlp_class: IDMLP), ``nn.py`` (``IDMLP``, ``LRLinear``) and
``algs/mend.py`` (``GradientTransform``). With zero weights in its residual branches and
no normalisation statistics it is the identity, and the edit is plain gradient descent
with step alpha: the property tests/baselines/test_mend.py checks exactly.
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = 2
"""Residual layers of the network: the reference's IDMLP builds n_hidden + 1 of them and
mend.yaml sets n_hidden: 1 (the paper's Sec. 3.1 writes the same two, h and g(z))."""

STD_EPS = 1e-7
"""Added to the standard deviation before dividing (algs/mend.py GradientTransform)."""


def factored_gradient(u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sum_t delta_t u_t^T: a linear weight's gradient, (out, in), from its per-token
    inputs ``u`` (N, in) and output gradients ``delta`` (N, out) (Sec. 3.1)."""
    return delta.t() @ u  # (out, N) @ (N, in) -> (out, in)


def token_factors(
    acts: torch.Tensor, grads: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (u, delta) pairs of the tokens that carry gradient, as (N, in) and (N, out)
    float32, from a batch's inputs ``acts`` (B, T, in), output gradients ``grads``
    (B, T, out) and token ``mask`` (B, T). Pads and tokens with a zero input or a zero
    gradient are left out, as the reference's ``nz_mask`` does: their rank-one terms are
    zero, but the network (and its normalisation) would not map them to zero."""
    keep = mask.bool() & (acts != 0).any(-1) & (grads != 0).any(-1)  # (B, T)
    return acts[keep].float(), grads[keep].float()


class LowRankResidual(nn.Module):
    """One layer of the network: z + max(0, U V z + b), U (D, r), V (r, D), r = min(rank, D).

    The reference's ``LRLinear`` with init "id": U starts at zero, so the layer starts
    as the identity, and V at a standard normal draw. It clamps at zero instead of a
    ReLU on purpose: at U = 0 every pre-activation is exactly 0, where a ReLU's gradient
    is 0 and training could never start; the clamp passes the gradient there."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pre = (z @ self.v.t()) @ self.u.t() + self.bias  # (N, r) -> (N, D)
        return z + pre.clamp(min=0)


class EditorNetwork(nn.Module):
    """g: (u, delta) -> (u~, delta~) for one edited weight, and the edit it makes.

    u and delta are concatenated and transformed together (mend.yaml ``combine: True``),
    after a per-feature normalisation to zero mean and unit variance whose statistics are
    gathered over every token seen in training (``norm: True``; algs/mend.py keeps a
    running Welford count). Before any statistics exist the input passes unnormalised.

    The paper's per-layer scale and offset (s, o in Sec. 3.1) let one network serve several
    weights of the same shape; with one edited weight they are absorbed in U, V and b, so
    they are left out. ``edit_lr`` is alpha, the learned step of this weight.
    """

    def __init__(
        self, in_dim: int, out_dim: int, rank: int = 1920, lr: float = 1e-4, seed: int = 0
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        dim = in_dim + out_dim
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([LowRankResidual(dim, rank, generator) for _ in range(LAYERS)])
        self.edit_lr = nn.Parameter(torch.tensor(float(lr)))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Add the tokens' (u, delta) to the normalisation statistics (Chan et al.'s
        batched form of the reference's one-token-at-a-time Welford update)."""
        z = torch.cat([u, delta], -1).to(self.mean)  # (N, D)
        n = float(z.shape[0])
        if n == 0:
            return
        total = self.count + n
        batch_mean = z.mean(0)
        shift = batch_mean - self.mean
        self.m2 += ((z - batch_mean) ** 2).sum(0) + shift**2 * self.count * n / total
        self.mean += shift * n / total
        self.count.fill_(total)

    def normalised(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, D) standardised by the gathered statistics; unchanged before two tokens
        were seen (the reference cannot normalise then either)."""
        if self.count.item() < 2:
            return z
        std = (self.m2 / (self.count - 1)).sqrt()
        return (z - self.mean) / (std + STD_EPS)

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u~, delta~): (N, in) and (N, out) from the tokens' u (N, in) and delta (N, out)."""
        z = self.normalised(torch.cat([u, delta], -1).float())  # (N, D)
        for layer in self.layers:
            z = layer(z)
        return z[:, : self.in_dim], z[:, self.in_dim :]

    def weight_update(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The edit's change of the weight, (out, in): -alpha * sum_t delta~_t u~_t^T.

        The sign is the paper's (W~ = W - alpha * grad~). The reference's algs/mend.py
        adds ``edit_lrs * grad~`` and leaves the sign to training; with the paper's sign
        the untrained network is a gradient descent step, not an ascent."""
        u_new, delta_new = self(u, delta)
        return -self.edit_lr * factored_gradient(u_new, delta_new)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of `state_dict` by name, with its shape (what a save must hold)."""
        return {name: tuple(t.shape) for name, t in self.state_dict().items()}
