"""GRACE (Hartvigsen et al., 2023): a discrete key-value codebook at one layer.

Keys are the wrapped module's input at the last token of an edit prompt, values are
trained replacement outputs for that token, and each key governs a ball (its deferral
radius). An input whose last-token activation falls inside the nearest key's ball gets
that key's value in place of the layer's output at that token; everything else is
untouched. That gives perfect locality and memorisation, but a paraphrase lands inside a
ball only if its activation happens to be that close: the "working memory" corner of the
paper's triangle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core.config import EditConfig
from ..core.draft import Draft, EditRequest, EditResult
from ..core.editor import EditorBase
from ..core.fastpath import Captured
from ..core.fit import adam_update
from ..core.layer import AttachedLayer, last_positions, last_token
from ..core.rows import EditRows
from ..core.validate import SaveChecker


@dataclass
class GraceConfig(EditConfig):
    """GRACE as the paper runs it (A.3): value learning rate 1.0, the original
    implementation's 100 iterations, replace_last, and epsilon_init to vary (B.1)."""

    epsilon_init: float = field(
        default=1.0,
        metadata={
            "help": "Deferral radius of a new key, in the Euclidean distance of the wrapped "
            "module's inputs (GRACE's default; the paper also tries 3 and 10)."
        },
    )
    lr: float = field(default=1.0, metadata={"help": "Adam learning rate of the value."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("epsilon_init", self.epsilon_init > 0, "must be > 0"),
            ]
        )


Action = Literal["add", "expand", "split"]


@dataclass(frozen=True)
class Placement:
    """Where an edit goes in the codebook, decided before anything changes.

    add: a new key with radius epsilon_init (no key is near);
    expand: the nearest key has the same label: its radius grows to reach the new key
        (never shrinks) and its value is retrained on this edit;
    split: the nearest key is near but has another label: a new key, and both radii
        become half their distance so the two balls no longer overlap.
    """

    action: Action
    index: int  # the entry the edit trains: new (== len) for add/split
    nearest: int | None
    distance: float | None
    radius: float  # radius of `index` after the edit
    nearest_radius: float | None  # radius of `nearest` after the edit


class Codebook:
    """Keys (N, I), values (N, O), radii (N,) and labels, with GRACE's rules."""

    def __init__(self, key_dim: int, value_dim: int, device: torch.device) -> None:
        self.keys = torch.zeros((0, key_dim), device=device)
        self.values = torch.zeros((0, value_dim), device=device)
        self.radii = torch.zeros((0,), device=device)
        self.labels: list[str] = []

    def __len__(self) -> int:
        return len(self.labels)

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of each query to each key: (B, N)."""
        return torch.cdist(queries.float(), self.keys)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest key of each query (B,) and whether the query is inside its ball."""
        if not len(self):
            none = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
            return none, torch.zeros_like(none, dtype=torch.bool)
        dist, index = self.distances(queries).min(dim=1)
        return index, dist <= self.radii[index]

    def place(self, key: torch.Tensor, label: str, epsilon_init: float) -> Placement:
        """GRACE's codebook update for an edit with ``key`` (I,) and ``label``."""
        new = len(self)
        if not new:
            return Placement("add", new, None, None, epsilon_init, None)
        dist, nearest = self.distances(key.view(1, -1))[0].min(dim=0)
        d, i, r = float(dist), int(nearest), float(self.radii[nearest])
        if d > r + epsilon_init:
            return Placement("add", new, i, d, epsilon_init, r)
        if self.labels[i] != label:
            return Placement("split", new, i, d, d / 2, d / 2)
        return Placement("expand", i, i, d, max(r, d), max(r, d))

    def apply(
        self, placement: Placement, key: torch.Tensor, label: str, value: torch.Tensor
    ) -> None:
        """Commit a placement with the trained ``value`` (O,)."""
        if placement.nearest is not None and placement.nearest_radius is not None:
            self.radii[placement.nearest] = placement.nearest_radius
        if placement.action == "expand":
            self.values[placement.index] = value
            self.radii[placement.index] = placement.radius
            return
        device = self.keys.device
        self.keys = torch.cat([self.keys, key.float().view(1, -1).to(device)])
        self.values = torch.cat([self.values, value.float().view(1, -1).to(device)])
        self.radii = torch.cat([self.radii, torch.tensor([placement.radius], device=device)])
        self.labels.append(label)


class GraceLayer(AttachedLayer):
    """The wrapped linear plus a codebook; replaces the output at the last token only."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        out_dim, in_dim = self.weight.shape
        self.codebook = Codebook(in_dim, out_dim, self.weight.device)

    def route(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """The codebook entry whose ball holds each sequence's last token (-1: none)."""
        entry, hit = self.codebook.lookup(last_token(acts, token_mask))
        return torch.where(hit, entry, torch.full_like(entry, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self._trial is not None:  # editing: (value, one position per row) for every row
            value, positions = self._trial
            out = out.clone()
            out[rows, positions] = value.to(out.dtype)
            return out
        if self._disabled or not len(self.codebook):
            return out
        mask = self.routing.mask_for(x)
        positions = last_positions(mask)
        entry, hit = self.codebook.lookup(last_token(x, mask))
        if not hit.any():
            return out
        out = out.clone()
        out[rows[hit], positions[hit]] = self.codebook.values[entry[hit]].to(out.dtype)
        return out


class _GraceDraft(Draft):
    """Adam on the value of the entry the edit goes to; the target NLL alone."""

    def __init__(
        self,
        placement: Placement,
        key: torch.Tensor,
        label: str,
        start: torch.Tensor,
        positions: torch.Tensor,
        lr: float,
    ) -> None:
        self.placement, self.key, self.label, self.positions = placement, key, label, positions
        self.memory = placement.index
        self.value = start.clone().requires_grad_(True)
        self._adam = adam_update([self.value], lr)

    def layer_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.value, self.positions

    def update(self, loss: torch.Tensor) -> None:
        self._adam(loss)

    def log_fields(self) -> dict[str, Any]:
        return {"action": self.placement.action}


class GraceEditor(EditorBase):
    """Lifelong editing with a GRACE codebook at the FFN value projection."""

    method = "GRACE"
    config_class = GraceConfig
    layer_class = GraceLayer
    route_unit = "codebook entry"
    retractable = True
    layer: GraceLayer

    @property
    def codebook(self) -> Codebook:
        return self.layer.codebook

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> _GraceDraft:
        return self._draft_in(self.codebook, rows, lower, request.target)

    def _draft_in(
        self, book: Codebook, rows: EditRows, lower: Captured, target: str
    ) -> _GraceDraft:
        """The draft of an edit placed in ``book``."""
        position = rows.input_ids.shape[1] - rows.targets.shape[1] - 1  # last prompt token
        key = lower.acts[0, position].float()
        label = " ".join(target.split())
        placement = book.place(key, label, self.config.epsilon_init)
        if placement.action == "expand":
            start = book.values[placement.index].clone()
        else:  # warm start: the layer's own output for this token
            with torch.no_grad():
                start = self.layer.base_layer(lower.acts[0, position]).float()
        positions = torch.tensor([position], device=self.device)
        return _GraceDraft(placement, key, label, start, positions, self.config.lr)

    def _commit(self, draft: Draft, result: EditResult) -> None:
        assert isinstance(draft, _GraceDraft)
        self.codebook.apply(draft.placement, draft.key, draft.label, draft.value.detach())

    def _rebuild_without(self, edit_id: int) -> tuple[Callable[[], None], int]:
        """A new codebook from every other live edit, in order: an edit can have moved or
        split other keys' balls, so the whole book is rebuilt (a few hundred Adam steps
        on one vector per edit). GRACE draws nothing at random, so the book equals the
        one a stream without the edit builds."""
        out_dim, in_dim = self.layer.weight.shape
        book = Codebook(in_dim, out_dim, self.device)
        kept = [i for i in self.live_edits() if i != edit_id]
        for index in kept:
            entry = self.edit_log[index]
            rows = self._edit_rows(entry["prompt"], entry["target"])
            lower = self._capture(rows, keep_lower_output=self.config.fast_path)
            draft = self._draft_in(book, rows, lower, entry["target"])
            self._fit(draft, rows, lower)
            book.apply(draft.placement, draft.key, draft.label, draft.value.detach())

        def install() -> None:
            self.layer.codebook = book

        return install, len(kept)

    def summary(self) -> dict[str, Any]:
        actions = [e.get("action") for e in self.edit_log]
        radii = self.codebook.radii
        return {
            **super().summary(),
            "keys": len(self.codebook),
            "actions": {a: actions.count(a) for a in ("add", "expand", "split")},
            "median_radius": float(radii.median()) if len(radii) else None,
        }

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"labels": self.codebook.labels}

    def _tensors(self) -> dict[str, torch.Tensor]:
        book = self.codebook
        return {"keys": book.keys, "values": book.values, "radii": book.radii}

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: GraceConfig, weight: torch.Tensor
    ) -> None:
        labels = check.strings(state, "labels") or []
        out_dim, in_dim = weight.shape
        check.tensor("keys", (len(labels), in_dim))
        check.tensor("values", (len(labels), out_dim))
        radii = check.tensor("radii", (len(labels),))
        if (radii <= 0).any():
            check.fail("editor_model.safetensors", "radii", "must be positive")

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        book, device = self.codebook, self.device
        book.keys = tensors["keys"].float().to(device)
        book.values = tensors["values"].float().to(device)
        book.radii = tensors["radii"].float().to(device)
        book.labels = list(state["labels"])
