"""The optimisation loop every method's edit runs: a loss, an update, an early stop."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

import torch

StopOn = Literal["loss", "lm", "answer"]
Update = Callable[[torch.Tensor], None]  # a loss -> one optimisation step
# Side steps (updates on the loss's other terms alone) may start once the target NLL is
# under this: the 'lm' stop's bound, where the answer has settled; above it the full
# steps it still needs train the other terms too.
SIDE_STEPS_LM = 0.05


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
    side_steps: int = 0  # updates on the side terms alone (see `fit`'s ``side_loss_fn``)


def fit(loss_fn: Callable[[], StepLoss], update: Update, **settings: Any) -> Fitted:
    """Run `fitting` with ``loss_fn`` giving each step's `StepLoss` and ``update`` turning
    a loss into one step (``settings``: `fitting`'s)."""
    run = fitting(update, **settings)
    try:
        next(run)
        while True:
            run.send(loss_fn())
    except StopIteration as done:
        return done.value


def fitting(
    update: Update,
    *,
    max_steps: int,
    early_stop_loss: float,
    patience: int = 1,
    stop_on: StopOn = "loss",
    side_loss_fn: Callable[[], torch.Tensor] | None = None,
    side_steps: int = 0,
    side_lm_bound: float = float("inf"),
    side_update: Update | None = None,
) -> Generator[None, StepLoss, Fitted]:
    """One edit's optimisation, as a generator that is sent each step's `StepLoss` and
    returns `Fitted`: a driver that sends several of them the losses of one batched
    forward trains several edits at once, each stopping exactly where it would alone.
    ``update`` turns the loss into one step; ``side_update`` (default ``update``) takes
    the side steps, which must apply at once (a batch driver may defer ``update`` to the
    next send: the state is read again only then).

    Stops after ``patience`` consecutive steps that meet `StepLoss.below` (``stop_on``,
    ``early_stop_loss``), or after ``max_steps`` forwards. A non-finite loss raises
    before anything is committed.

    ``side_loss_fn`` (with ``stop_on='answer'``): the loss's terms other than the target
    NLL, computed without the model's forward (WISE: the routing margins, read at the
    edited layer's input). Once a forward finds the answer right, its target NLL under
    ``side_lm_bound`` and only those terms above the bound, up to ``side_steps`` updates
    go to them alone (each a small fraction of a step's cost) until they are under it;
    the next forward checks that the answer still holds, and full steps resume where it
    does not. (While the target NLL is still falling, the full steps it needs train the
    side terms as well; below the NLL bound they are the side terms' alone.) ``steps``
    counts forwards.
    """
    side_update = side_update or update
    below, n, cheap = 0, 0, 0
    loss_value = lm_value = float("nan")
    answered_at: int | None = None
    use_side = side_loss_fn is not None and side_steps > 0 and stop_on == "answer"
    for n in range(1, max_steps + 1):
        step = yield
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
        if use_side and below == 0 and bool(step.answered) and lm_value < side_lm_bound:
            assert side_loss_fn is not None
            taken, lowered = _fit_side(side_loss_fn, side_update, early_stop_loss, side_steps)
            cheap += taken
            if lowered:
                continue  # the next forward checks the answer under the new state
            # the side terms do not fall on their own (or are not what is above the
            # bound): full steps from here on
            use_side = False
            if taken:
                continue  # the state moved: take the next forward's loss, not this one's
        update(step.loss)
    return Fitted(n, loss_value, lm_value, answered_at, cheap)


def _fit_side(
    side_loss_fn: Callable[[], torch.Tensor],
    update: Callable[[torch.Tensor], None],
    bound: float,
    limit: int,
) -> tuple[int, bool]:
    """Update on the side terms until they are under ``bound`` (at most ``limit``
    updates). Returns the number of updates and whether they lowered the side terms."""
    side = _finite_side(side_loss_fn())
    first, taken = side.item(), 0
    while side.item() >= bound and taken < limit:
        update(side)
        taken += 1
        side = _finite_side(side_loss_fn())
    return taken, side.item() < first


def _finite_side(side: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(side):
        raise FloatingPointError(f"edit loss's side terms became {side.item()}")
    return side


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
