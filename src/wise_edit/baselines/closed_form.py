"""The closed-form weight updates of ROME, MEMIT and AlphaEdit, as pure functions.

Shapes follow nn.Linear: a value matrix W is (O, I) and maps a key k (I,) to W k (O,).
Keys and residuals of several edits are stacked as columns: K (I, n), R (O, n). Every
solve runs in fp64 (as MEMIT's reference code does) and returns fp64.
"""

from __future__ import annotations

import torch


def rome_update(
    key: torch.Tensor,
    residual: torch.Tensor,
    moment: torch.Tensor,
    at: torch.Tensor | None = None,
) -> torch.Tensor:
    """ROME's rank-one update (ROME section 3.1, Eq. 2): ΔW = Λ u^T, changing W only along
    u = C^-1 k*, with k* = ``key`` (the mean key over the contexts) and Λ = residual /
    (u^T at), so that ΔW at = ``residual``.

    ``at`` None: k* itself, the paper's Eq. 2: with residual v* - W k*, (W + ΔW) k* = v*,
    the update that does so while changing the outputs of keys distributed as C least.
    The reference code (`rome/compute_v.py`, `rome_main.py`) keeps u but writes at the
    raw prompt's key k: ``right_vector = (v* - W k) / (k . u)``, v* being that prompt's
    own output plus the optimised δ, so the prompt that was edited gets exactly v*.
    ``residual`` (O,); ``moment`` C (I, I); ``at`` (I,). Returns ΔW (O, I)."""
    k = key.double()
    u = torch.linalg.solve(moment.double(), k)  # C^-1 k* (I,)
    target = k if at is None else at.double()
    return torch.outer(residual.double() / (u @ target), u)


def memit_update(
    keys: torch.Tensor, residuals: torch.Tensor, moment: torch.Tensor, weight: float
) -> torch.Tensor:
    """MEMIT's batch update of one layer (MEMIT section 4.3, Eq. 14):
    ΔW = R K^T (λ C + K K^T)^-1, the minimiser of ||ΔW K - R||^2 + λ tr(ΔW C ΔW^T), which
    writes the new keys' residuals while keeping the outputs of the preserved keys (whose
    second moment is C, weighted by λ = ``weight``). ``keys`` K (I, n), ``residuals``
    R (O, n), ``moment`` C (I, I). Returns ΔW (O, I)."""
    k, r = keys.double(), residuals.double()
    system = weight * moment.double() + k @ k.t()  # (I, I), symmetric
    return torch.linalg.solve(system, k @ r.t()).t()  # (R K^T A^-1)^T = A^-1 K R^T


def null_space_projection(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, threshold: float
) -> torch.Tensor:
    """AlphaEdit's projection P = U_0 U_0^T onto the span of the eigenvectors of C whose
    eigenvalue is below ``threshold`` (AlphaEdit section 3.2; reference code
    `get_project`): keys of preserved knowledge lie (almost) in the orthogonal
    complement, so P k_0 ≈ 0 for them. Eigenvectors are columns. Returns P (I, I)."""
    kept = eigenvectors.double()[:, eigenvalues < threshold]  # (I, r)
    return kept @ kept.t()


def alphaedit_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projection: torch.Tensor,
    prior: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """AlphaEdit's update (AlphaEdit Eq. 11, as the reference code solves it):
    ΔW = R K^T P ((K K^T + K_p K_p^T) P + α I)^-1, the minimiser of
    ||ΔW' P K - R||^2 + ||ΔW' P K_p||^2 + α ||ΔW' P||^2 over ΔW = ΔW' P. Every row of ΔW is
    a combination of P's rows, so ΔW k_0 = 0 wherever P k_0 = 0: the preserved keys'
    outputs do not move, and neither do those of earlier edits whose keys ``prior``
    (K_p K_p^T, (I, I)) holds, as far as the least squares can keep them. ``weight``: α
    (the reference's ``L2``). Returns ΔW (O, I)."""
    k, r, p = keys.double(), residuals.double(), projection.double()
    eye = torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    system = p @ (k @ k.t() + prior.double()) + weight * eye  # (I, I)
    return torch.linalg.solve(system, p @ k @ r.t()).t()
