"""The optimisation loop every method's edit runs: a loss, an update, an early stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Fitted:
    """How an edit's optimisation ended."""

    steps: int
    loss: float
    lm_loss: float


def fit(
    loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    update: Callable[[torch.Tensor], None],
    *,
    max_steps: int,
    early_stop_loss: float,
    patience: int = 1,
    stop_on_lm: bool = False,
) -> Fitted:
    """``loss_fn`` gives (loss, LM part), ``update`` turns the loss into one step.

    Stops after ``patience`` consecutive steps below ``early_stop_loss`` (of the LM part
    with ``stop_on_lm``, else of the whole loss), or after ``max_steps`` forwards. A
    non-finite loss raises before anything is committed.
    """
    below, n = 0, 0
    loss_value = lm_value = float("nan")
    for n in range(1, max_steps + 1):
        loss, lm = loss_fn()
        loss_value, lm_value = loss.item(), lm.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"edit loss became {loss_value} at step {n}; the edit was not applied "
                "(try a smaller lr)"
            )
        below = below + 1 if (lm_value if stop_on_lm else loss_value) < early_stop_loss else 0
        if below >= patience:
            break
        update(loss)
    return Fitted(n, loss_value, lm_value)


def adam_update(
    params: list[torch.Tensor], lr: float, after: Callable[[], None] | None = None
) -> Callable[[torch.Tensor], None]:
    """An `update` for `fit`: one Adam step on ``params``, then ``after`` (a projection)."""
    optimizer = torch.optim.Adam(params, lr=lr)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after is not None:
            with torch.no_grad():
                after()

    return update
