"""The settings every baseline has: an optimiser step size, an iteration budget with
early stopping, and the fast editing forward. Each method overrides the defaults with
the paper's."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import TargetConfig


@dataclass
class BaselineConfig(TargetConfig):
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    max_steps: int = field(default=100, metadata={"help": "Iterations per edit, at most."})
    early_stop_loss: float = field(
        default=1e-2, metadata={"help": "Stop an edit once the target NLL is below this."}
    )
    fast_path: bool = field(
        default=True, metadata={"help": "Recompute only the edited layer and those above."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("lr", self.lr > 0, "must be > 0"),
                ("max_steps", self.max_steps >= 1, "must be >= 1"),
                ("early_stop_loss", self.early_stop_loss >= 0, "must be >= 0"),
            ]
        )
