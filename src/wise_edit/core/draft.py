"""The shapes every method shares: what one edit did (`EditResult`), what one edit
trains (`Draft`, which a method fills in), and what evaluation, the benchmark and the
CLI may use of any editor (`Editor`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .persistence import Saved


@dataclass(frozen=True)
class EditRequest:
    """What one edit asks for. ``subject``: the entity the prompt is about, as written in
    it ("Louis Vola" in "Louis Vola lost their life at"); a method that can use it does
    (WISE's subject-swapped negatives), the others ignore it."""

    prompt: str
    target: str
    subject: str | None = None

    @classmethod
    def of_entry(cls, entry: Mapping[str, Any]) -> EditRequest:
        """The request an edit-log entry was made from (to retrain it)."""
        return cls(entry["prompt"], entry["target"], entry.get("subject"))


@dataclass
class EditResult:
    """What one edit did. ``memory``: the WISE side memory or GRACE codebook entry it went
    to, ``shard``: WISE's shard; -1 where the method has no such thing."""

    index: int
    prompt: str
    target: str
    steps: int
    loss: float
    lm_loss: float
    seconds: float
    memory: int = -1
    shard: int = -1
    answered_at: int | None = None  # first step whose greedy answer was right (`Fitted`)
    side_steps: int = 0  # updates on the routing margins alone, beside ``steps`` (`Fitted`)


class Draft:
    """One edit while it trains: what the wrapped layer computes with, the loss around
    the target NLL, and one optimisation step. Nothing in the editor changes until the
    editor commits the draft."""

    memory: int = -1  # where the edit goes, for `EditResult`
    shard: int = -1

    def layer_state(self) -> Any:
        """What the layer's `trial` forward reads."""
        raise NotImplementedError

    def loss(self, lm: torch.Tensor, state: Any) -> torch.Tensor:
        """The training loss given the target NLL ``lm`` computed with ``state`` (what
        `layer_state` returned for this step); plain fine-tuning is ``lm``."""
        side = self.side_loss(state)
        return lm if side is None else lm + side

    def side_loss(self, state: Any) -> torch.Tensor | None:
        """The loss's terms beside the target NLL that need no forward of the model
        (WISE: the routing margins); None where there are none. The editing loop may
        take cheap steps on these alone (`fit`'s ``side_loss_fn``)."""
        return None

    def update(self, loss: torch.Tensor) -> None:
        """One optimisation step from ``loss``."""
        raise NotImplementedError

    # what a draft trained together with others (`EditorBase.edit_many` with a batch)
    # exposes: its parameters, and a step from their gradients
    params: list[torch.Tensor]

    def apply(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimisation step from the loss's gradients for `params`."""
        raise NotImplementedError

    def rehearsal(self) -> Sequence[tuple[Any, Any]]:
        """(rows, captured lower part) of earlier edits whose target NLL is added to
        this edit's at every step, so that training it does not overwrite them; none by
        default."""
        return ()

    def log_fields(self) -> dict[str, Any]:
        """What the method records in the edit log beside `EditResult`."""
        return {}


@runtime_checkable
class Editor(Protocol):
    """What evaluation, the benchmark and the CLI use of an editor, whatever its method."""

    method: ClassVar[str]
    routes: ClassVar[bool]
    route_unit: ClassVar[str]
    model: nn.Module
    tokenizer: Any
    config: Any
    edit_log: list[dict[str, Any]]

    @classmethod
    def variant_of(cls, config: Any) -> str: ...

    @property
    def num_edits(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def edit_batch(self) -> int | None: ...

    def edit(
        self,
        prompt: str,
        target: str,
        meta: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
    ) -> EditResult: ...

    def edit_many(
        self,
        records: Iterable[Mapping[str, Any] | tuple[str, str]],
        progress: bool = False,
        batch: int | None = None,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[EditResult]: ...

    def routed(self, prompts: Sequence[str]) -> list[int]: ...

    def routing_detail(self, prompts: Sequence[str]) -> tuple[list[int], list[float] | None]: ...

    def memory_holding(self, edit_id: int) -> int | None: ...

    def disabled(self) -> Any: ...

    def summary(self) -> dict[str, Any]: ...

    def snapshot(self) -> Saved: ...

    def save_pretrained(self, path: Any, replace: bool = False) -> None: ...

    def detach(self) -> nn.Module: ...
