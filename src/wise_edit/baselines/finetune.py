"""FT-L and FT-EWC: fine-tune the very matrix WISE gives a side memory, in place.

Both edit the main memory directly (no routing), so every edit reaches every input:
the "long-term memory" corner of the paper's triangle. The change from the original
weight is kept as a separate ``delta`` so `detach()` restores the model exactly and a
save holds only what was learned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import EditConfig, StopOn
from ..core.draft import Draft, EditRequest, EditResult
from ..core.editor import EditorBase
from ..core.fastpath import Captured
from ..core.fit import adam_update
from ..core.layer import AttachedLayer
from ..core.rows import EditRows
from ..core.validate import SaveChecker
from ..wise.shards import clamp_to_bound


@dataclass
class FTLConfig(EditConfig):
    """FT-L as in the paper's Appendix A.2-A.3 (ROME's re-implementation): Adam at 5e-4,
    50 iterations, autoregressive loss on the target, an L-infinity bound on the change
    from the original weights."""

    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate."})
    max_steps: int = field(default=50, metadata={"help": "Iterations per edit, at most."})
    norm_bound: float | None = field(
        default=1.0,
        metadata={
            "help": "Every weight stays within +-norm_bound of its original value over the "
            "whole stream of edits (None: unbounded). 1.0 is WISE's bound on its side "
            "memory, so FT-L differs from WISE only in editing the main memory unrouted; "
            "ROME's 5e-4, set for much larger models, holds a small model's weights too "
            "close to their original values for an edit to be learnt."
        },
    )
    early_stop_loss: float = field(
        default=1e-2, metadata={"help": "Stop an edit once the target NLL is below this."}
    )
    early_stop_on: StopOn = field(
        default="lm", metadata={"help": "The penalty need not vanish: stop on the NLL."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                (
                    "norm_bound",
                    self.norm_bound is None or self.norm_bound > 0,
                    "must be > 0 or None",
                ),
            ]
        )


@dataclass
class FTEWCConfig(FTLConfig):
    """FT-EWC as in GRACE's re-implementation (the paper's A.3): Adam at 1e-2, no L-infinity
    bound, penalty lambda * sum(F * (W - W_before)^2) with a diagonal Fisher F from the
    most recent past edits."""

    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate."})
    max_steps: int = field(default=100, metadata={"help": "Iterations per edit, at most."})
    norm_bound: float | None = field(
        default=None, metadata={"help": "The paper omits the bound for FT-EWC."}
    )
    ewc_lambda: float = field(default=0.1, metadata={"help": "Weight of the EWC penalty."})
    replay: int = field(
        default=10,
        metadata={"help": "Most recent past edits replayed to estimate the Fisher diagonal."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("ewc_lambda", self.ewc_lambda >= 0, "must be >= 0"),
                ("replay", self.replay >= 1, "must be >= 1"),
            ]
        )


class DeltaLayer(AttachedLayer):
    """The wrapped linear plus a learned change: base(x) + x @ delta^T.

    Rows are not routed: the change applies to every input, as fine-tuning does.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = self.weight
        self.register_buffer(
            "delta", torch.zeros(weight.shape, device=weight.device), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self._disabled:
            return base
        delta = self.delta if self._trial is None else self._trial
        return base + (x.float() @ delta.t()).to(base.dtype)


class _DeltaDraft(Draft):
    """Adam on a step from the committed change, projected back into the L-infinity box
    after every step; the loss is the target NLL plus the method's penalty, if any."""

    def __init__(
        self,
        before: torch.Tensor,
        penalty: Callable[[torch.Tensor], torch.Tensor] | None,
        config: FTLConfig,
    ) -> None:
        self.before, self.penalty = before, penalty
        self.step = torch.zeros_like(before, requires_grad=True)
        bound = config.norm_bound

        def project() -> None:
            self.step.copy_(clamp_to_bound(self.step, before, bound))

        self._adam = adam_update([self.step], config.lr, project if bound is not None else None)

    def update(self, loss: torch.Tensor) -> None:
        self._adam(loss)

    def layer_state(self) -> torch.Tensor:
        return self.before + self.step

    def loss(self, lm: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        return lm if self.penalty is None else lm + self.penalty(self.step)


class FTLEditor(EditorBase):
    """Sequential fine-tuning of one FFN value matrix (FT-L)."""

    method = "FT-L"
    config_class = FTLConfig
    layer_class = DeltaLayer
    routes = False
    route_unit = "edited weights"
    layer: DeltaLayer

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> _DeltaDraft:
        before = self.layer.delta.clone()
        return _DeltaDraft(before, self._penalty(before), self.config)

    def _commit(self, draft: Draft, result: EditResult) -> None:
        assert isinstance(draft, _DeltaDraft)
        self.layer.delta.copy_(draft.before + draft.step.detach())

    def _penalty(self, before: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A term added to the LM loss of an edit, as a function of the step from
        ``before``; plain fine-tuning has none."""
        return None

    def summary(self) -> dict[str, Any]:
        delta = self.layer.delta
        return {
            "max_abs_change": float(delta.abs().max()),
            "mean_abs_change": float(delta.abs().mean()),
            **super().summary(),
        }

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.layer.delta}

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: FTLConfig, weight: torch.Tensor
    ) -> None:
        check.tensor("delta", weight.shape, bound=config.norm_bound)

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.layer.delta.copy_(tensors["delta"])


class FTEWCEditor(FTLEditor):
    """Fine-tuning with elastic weight consolidation (FT-EWC).

    Before each edit the diagonal Fisher is estimated from the ``replay`` most recent
    past edits (squared gradients of their target NLL at the current weights, averaged),
    and weights important to them are anchored at their current values.
    """

    method = "FT-EWC"
    config_class = FTEWCConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the frozen lower part of past edits' forwards never changes: captured once
        self._past: dict[int, tuple[EditRows, Captured]] = {}

    def _penalty(self, before: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        fisher = self.fisher(before)
        if fisher is None:
            return None
        lam = self.config.ewc_lambda
        return lambda step: lam * (fisher * step.pow(2)).sum()

    def fisher(self, delta: torch.Tensor) -> torch.Tensor | None:
        """Diagonal Fisher estimate at ``delta`` from the most recent past edits."""
        recent = range(max(0, len(self.edit_log) - self.config.replay), len(self.edit_log))
        if not recent:
            return None
        total = torch.zeros_like(delta)
        for index in recent:
            rows, lower = self._past_edit(index)
            probe = torch.zeros_like(delta, requires_grad=True)
            with self.layer.trial(delta + probe):
                loss = self._lm_loss(rows, lower)
            (grad,) = torch.autograd.grad(loss, probe)
            total += grad.pow(2)
        for old in [i for i in self._past if i < recent.start]:
            del self._past[old]
        return total / len(recent)

    def _past_edit(self, index: int) -> tuple[EditRows, Captured]:
        if index not in self._past:
            entry = self.edit_log[index]
            rows = self._edit_rows(entry["prompt"], entry["target"])
            self._past[index] = (rows, self._capture(rows, self.config.fast_path))
        return self._past[index]
