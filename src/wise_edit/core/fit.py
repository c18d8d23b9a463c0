"""The optimisation loop every method's edit runs: a loss, an update, an early stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

StopOn = Literal["loss", "lm", "answer"]


@dataclass
class StepLoss:
    """One step's training loss, its target-NLL part, and whether every trained target
    token is already the model's greedy choice (None where not computed)."""

    loss: torch.Tensor
    lm: torch.Tensor
    answered: torch.Tensor | bool | None = None

    def below(self, stop_on: StopOn, bound: float) -> bool:
        """The stop condition of ``stop_on``: 'loss' the whole loss, 'lm' the target NLL
        under ``bound``; 'answer': every target token greedy-right and the loss's other
        terms (e.g. WISE's routing margins) under ``bound``."""
        if stop_on == "loss":
            return self.loss.item() < bound
        if stop_on == "lm":
            return self.lm.item() < bound
        if self.answered is None:
            raise ValueError("stop_on='answer' needs a loss that reports greedy hits")
        return bool(self.answered) and (self.loss - self.lm).item() < bound


@dataclass
class Fitted:
    """How an edit's optimisation ended. ``answered_at``: the first forward at which every
    trained target token was the greedy choice (None: never, or not computed); the steps
    after it went to the loss's other terms (WISE: the routing margins) and the patience."""

    steps: int
    loss: float
    lm_loss: float
    answered_at: int | None = None


def fit(
    loss_fn: Callable[[], StepLoss],
    update: Callable[[torch.Tensor], None],
    *,
    max_steps: int,
    early_stop_loss: float,
    patience: int = 1,
    stop_on: StopOn = "loss",
) -> Fitted:
    """``loss_fn`` gives one step's `StepLoss`, ``update`` turns the loss into one step.

    Stops after ``patience`` consecutive steps that meet `StepLoss.below` (``stop_on``,
    ``early_stop_loss``), or after ``max_steps`` forwards. A non-finite loss raises
    before anything is committed.
    """
    below, n = 0, 0
    loss_value = lm_value = float("nan")
    answered_at: int | None = None
    for n in range(1, max_steps + 1):
        step = loss_fn()
        loss_value, lm_value = step.loss.item(), step.lm.item()
        if answered_at is None and step.answered is not None and bool(step.answered):
            answered_at = n
        if not torch.isfinite(step.loss):
            raise FloatingPointError(
                f"edit loss became {loss_value} at step {n}; the edit was not applied "
                "(try a smaller lr)"
            )
        below = below + 1 if step.below(stop_on, early_stop_loss) else 0
        if below >= patience:
            break
        update(step.loss)
    return Fitted(n, loss_value, lm_value, answered_at)


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
