"""The side-memory layer: holds the frozen value projection (main memory) and the side
memories, and routes each sequence to one of them."""

from __future__ import annotations

import torch
from torch import nn

from .editing import AttachedLayer
from .router import route, sequence_scores


class SideMemory(nn.Module):
    """One side memory W_v' = W_v + delta, stored as the delta.

    Besides the served ``delta`` it keeps the shards of its current merge group: their
    masks and, compactly (only the masked entries), what each shard has learned so far.
    Merging folds them into ``delta`` and drops them.
    """

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("delta", torch.zeros(shape, device=device), persistent=False)
        self.masks: list[torch.Tensor] = []
        self.shard_values: list[torch.Tensor] = []
        self.epsilon = float("inf")  # routing threshold; inf until the memory holds an edit
        self.edit_ids: list[int] = []  # indices into the editor's edit log
        self.merges = 0  # merge groups completed
        self.closed = False  # retrieve mode: no further edits after its merge

    def shard_vector(self, shard: int) -> torch.Tensor:
        """Dense task vector of a shard of the current group (zeros outside its mask)."""
        full = torch.zeros_like(self.delta)
        full[self.masks[shard].to(full.device)] = self.shard_values[shard]
        return full


class WiseLayer(AttachedLayer):
    """Wraps a value projection (nn.Linear or GPT-2 Conv1D, bias kept).

    forward: trial (editing) -> base + a·delta for all rows; no memories or disabled ->
    base; else each row gets base, or base + a·delta of the memory its routing chose.
    Rows routed to the main memory get exactly ``base_layer``'s output.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.memories = nn.ModuleList()

    def new_memory(self) -> SideMemory:
        weight = self.weight
        memory = SideMemory(weight.shape, weight.device)
        self.memories.append(memory)
        return memory

    def scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Activation score of every sequence against every memory: (M, B)."""
        return torch.stack([sequence_scores(acts, m.delta, token_mask) for m in self.memories])

    def thresholds(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([m.epsilon for m in self.memories], device=device)

    def _decide(self, acts: torch.Tensor) -> torch.Tensor:
        state = self.routing
        return state.decide(
            acts.shape[0],
            lambda: route(self.scores(acts, state.mask_for(acts)), self.thresholds(acts.device)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        if self._trial is not None:  # editing: base + a·delta for every row, unrouted
            return base + (x.float() @ self._trial.t()).to(base.dtype)
        if self._disabled or not self.memories:
            return base
        choice = self._decide(x)
        out = base.clone()
        for index in choice.unique().tolist():
            if index < 0:
                continue
            rows = choice == index
            delta = self.memories[index].delta
            out[rows] = base[rows] + (x[rows].float() @ delta.t()).to(base.dtype)
        return out
