"""The side-memory layer: a peft-style wrapper that holds the frozen value projection
(the main memory) and the side memories, and in its forward gives each sequence the
memory `router.route` chose for it."""

from __future__ import annotations

import torch
from torch import nn

from ..core.layer import AttachedLayer, unrouted
from .memory import SideMemory
from .router import KeyIndex, best_scores, centred_unit, route, value_change


class WiseLayer(AttachedLayer):
    """Wraps a value projection (nn.Linear or GPT-2 Conv1D, bias kept).

    forward: trial (editing) -> base + a·delta for all rows; no memories or disabled ->
    base; else each row gets base, or base + a·delta of the memory its routing chose.
    Rows routed to the main memory get exactly ``base_layer``'s output.
    """

    reads_content = True

    def __init__(
        self,
        base_layer: nn.Module,
        candidates: int = 0,
        radius: float = 0.0,
        subject_tau: float = 0.0,
        rank: int = 0,
        gate: bool = True,
    ) -> None:
        super().__init__(base_layer)
        self.memories = nn.ModuleList()
        self.rank = rank  # of each edit in a new memory; 0: dense memories
        self.candidates = candidates  # 0: score every memory; k: those of the k nearest keys
        self.radius = radius  # > 0: a memory takes only rows this near one of its keys
        # > 0: the subject gate, reading `routing.lower` (set by the editor's hook) against
        # the neutral mean of that lower layer, ``subject_centre`` (set by calibration)
        self.subject_tau = subject_tau
        self.subject_centre: torch.Tensor | None = None
        self.gate = gate  # False: every sequence to its top memory (`routing.gate`)
        self._index: KeyIndex | None = None

    def new_memory(self) -> SideMemory:
        memory = SideMemory(self.weight.shape, self.weight.device, self.rank)
        self.memories.append(memory)
        return memory

    def scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Activation score of every sequence against every memory: (M, B)."""
        return torch.stack([m.scores(acts, token_mask) for m in self.memories])

    def key_index(self, device: torch.device) -> KeyIndex:
        self._index = KeyIndex.current([m.keys for m in self.memories], device, self._index)
        return self._index

    def route(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        if not self.memories:
            return unrouted(acts)
        states = None
        if self.subject_tau > 0 and self.subject_centre is not None:
            lower = self.routing.lower
            if lower is None or lower.shape[:2] != token_mask.shape:
                raise RuntimeError(
                    "the subject gate found no lower-layer states of this sequence; "
                    "was the model run without its editor's hooks?"
                )
            states = centred_unit(lower, self.subject_centre)
        return route(
            acts,
            token_mask,
            self.memories,
            self.key_index(acts.device),
            candidates=self.candidates,
            radius=self.radius,
            subject_states=states,
            subject_tau=self.subject_tau,
            gate=self.gate,
        )

    def route_scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor | None:
        if not self.memories:
            return None
        index = self.key_index(acts.device)
        return best_scores(acts, token_mask, self.memories, index, self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self._trial is not None:  # editing: base + a·delta for every row, unrouted
            return base + value_change(x, self._trial).to(base.dtype)
        if self._disabled or not self.memories:
            return base
        routing = self.routing
        choice = routing.decide(x.shape[0], lambda: self.route(x, routing.mask_for(x)))
        out = base.clone()
        for index in choice.unique().tolist():
            if index < 0:
                continue
            rows = choice == index
            change = self.memories[index].change
            out[rows] = base[rows] + value_change(x[rows], change).to(base.dtype)
        return out
