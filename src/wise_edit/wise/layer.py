"""The side-memory layer: holds the frozen value projection (main memory) and the side
memories, and routes each sequence to one of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layer import AttachedLayer, unrouted
from ..core.validate import SaveChecker
from .merging import MergeFn
from .router import (
    candidate_scores,
    mean_inputs,
    route_sparse,
    sequence_scores,
    threshold,
    unit_candidates,
    value_change,
)
from .subject import centred_unit, subject_gate

if TYPE_CHECKING:
    from .config import WiseConfig


class _KeyIndex(NamedTuple):
    sources: list[torch.Tensor]  # each memory's ``keys`` when the index was built
    keys: torch.Tensor  # (E, I)
    unit: torch.Tensor  # (E, I), rows of unit length
    owners: torch.Tensor  # (E,) the memory holding each edit


class SideMemory(nn.Module):
    """One side memory W_v' = W_v + delta, stored as the delta, with everything that
    belongs to it: the shards of its current merge group (their masks and, compactly, the
    masked entries each shard has learned), the edits it holds, its routing threshold.

    The editor decides where an edit goes; the memory folds it in (`add_edit`), merges
    its shards (`merge`) and refreshes its threshold (`refresh_threshold`).
    """

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("delta", torch.zeros(shape, device=device), persistent=False)
        # one key per edit: the mean of its prompt's value-matrix inputs (retrieval index)
        self.register_buffer("keys", torch.zeros((0, shape[1]), device=device), persistent=False)
        # one subject key per edit (`subject.py`), zeros for an edit without a subject
        self.register_buffer(
            "subject_keys", torch.zeros((0, shape[0]), device=device), persistent=False
        )
        self._masks: list[torch.Tensor] = []
        self._shard_values: list[torch.Tensor] = []
        self._epsilon = float("inf")  # routing threshold; inf until the memory holds an edit
        self._edit_ids: list[int] = []  # indices into the editor's edit log
        self._merges = 0  # merge groups completed
        self._group_edits = 0  # edits since the last merge
        self._closed = False  # retrieve mode: no further edits after its merge

    # ------------------------------------------------------------------ read-only state
    @property
    def epsilon(self) -> float:
        return self._epsilon

    @property
    def merges(self) -> int:
        return self._merges

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def edit_ids(self) -> tuple[int, ...]:
        return tuple(self._edit_ids)

    @property
    def group_edits(self) -> int:
        """Edits trained into the current merge group's shards so far."""
        return self._group_edits

    @property
    def masks(self) -> tuple[torch.Tensor, ...]:
        """The current merge group's shard masks (empty between groups)."""
        return tuple(self._masks)

    @property
    def shard_count(self) -> int:
        return len(self._shard_values)

    def shard_vector(self, shard: int) -> torch.Tensor:
        """Dense task vector of a shard of the current group (zeros outside its mask)."""
        full = torch.zeros_like(self.delta)
        full[self._masks[shard].to(full.device)] = self._shard_values[shard]
        return full

    def scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Activation score of each sequence against this memory: (B,)."""
        return sequence_scores(acts, self.delta, token_mask)

    # ------------------------------------------------------------------ changes
    def add_key(self, key: torch.Tensor) -> None:
        """Index an edit of this memory by its key (I,). ``keys`` is replaced, never
        changed in place: the layer's index knows it is current by the tensors' identity."""
        self.keys = torch.cat([self.keys, key.float().view(1, -1).to(self.keys.device)])

    def add_subject_key(self, key: torch.Tensor) -> None:
        """The subject gate's key of the edit just added (H,), zeros for none; replaced,
        like ``keys``, never changed in place."""
        row = key.float().view(1, -1).to(self.subject_keys.device)
        self.subject_keys = torch.cat([self.subject_keys, row])

    def add_edit(
        self, edit_id: int, shard: int, step: torch.Tensor, group_masks: Sequence[torch.Tensor]
    ) -> None:
        """Fold an edit's trained ``step`` (dense, zero outside the shard's mask) into the
        served delta and into its shard. ``group_masks`` are taken when a group starts."""
        if not self._masks:
            self._masks = [m.cpu() for m in group_masks]
        while len(self._shard_values) <= shard:
            count = int(self._masks[len(self._shard_values)].sum())
            self._shard_values.append(torch.zeros(count, device=self.delta.device))
        self.delta += step
        self._shard_values[shard] += step[self._masks[shard].to(self.delta.device)]
        self._edit_ids.append(edit_id)
        self._group_edits += 1

    def merge(
        self,
        merge_fn: MergeFn,
        *,
        density: float,
        generator: torch.Generator,
        norm_bound: float | None,
        close: bool,
    ) -> None:
        """Eq. 8: W_v' <- W_v + Merge(shard task vectors), on top of earlier merges; the
        group's shards are dropped. ``close``: take no further edits (retrieve mode)."""
        vectors = [self.shard_vector(i) for i in range(len(self._shard_values))]
        earlier = self.delta - torch.stack(vectors).sum(0)
        weights = [1.0 / len(vectors)] * len(vectors)
        merged = merge_fn(vectors, weights, density=density, generator=generator)
        total = earlier + merged.to(earlier.device)
        if norm_bound is not None:
            total = total.clamp(-norm_bound, norm_bound)
        self.delta.copy_(total)
        self._masks, self._shard_values = [], []
        self._merges += 1
        self._group_edits = 0
        self._closed = close

    def close(self) -> None:
        """Take no further edits (retrieve mode; a rebuilt memory keeps being closed)."""
        self._closed = True

    def refresh_threshold(self, acts: torch.Tensor, token_mask: torch.Tensor, ratio: float) -> None:
        """epsilon from the prompt activations (N, T, I) of all edits the memory holds now:
        later edits and merges move the scores of earlier ones, so a threshold frozen at
        edit time would drop them."""
        self._epsilon = threshold(self.scores(acts, token_mask), ratio)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, object]:
        return {
            "epsilon": self._epsilon,
            "edit_ids": list(self._edit_ids),
            "merges": self._merges,
            "closed": self._closed,
            "masks": len(self._masks),
            "shards": len(self._shard_values),
        }

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.delta": self.delta, f"{prefix}.keys": self.keys}
        out[f"{prefix}.subject_keys"] = self.subject_keys
        out.update({f"{prefix}.mask.{j}": m for j, m in enumerate(self._masks)})
        out.update({f"{prefix}.shard.{j}": v for j, v in enumerate(self._shard_values)})
        return out

    @staticmethod
    def check_saved(
        check: SaveChecker,
        meta: dict[str, Any],
        prefix: str,
        shape: torch.Size,
        config: WiseConfig,
    ) -> None:
        """Check what `state` and `tensors` wrote for one memory against the config."""
        ids = check.field(meta, "edit_ids", list)
        check.number(meta, "epsilon", low=0.0)
        merges = check.integer(meta, "merges")
        per_group = config.edits_per_memory()
        if not 0 <= len(ids) - merges * per_group < max(1, per_group):
            check.fail("editor_state.json", f"{prefix}: edit_ids", f"do not fit {merges} merges")
        check.field(meta, "closed", bool)
        masks = check.integer(meta, "masks", high=config.shards_per_merge)
        shards = check.integer(meta, "shards", high=masks)
        check.tensor(f"{prefix}.delta", shape, bound=config.norm_bound)
        if f"{prefix}.keys" in check.tensors:  # saves before the retrieval index have none
            check.tensor(f"{prefix}.keys", (len(ids), shape[1]))
        if f"{prefix}.subject_keys" in check.tensors:  # saves before the subject gate have none
            check.tensor(f"{prefix}.subject_keys", (len(ids), shape[0]))
        for j in range(masks):
            mask = check.tensor(f"{prefix}.mask.{j}", shape, kind="bool")
            if j < shards:
                check.tensor(f"{prefix}.shard.{j}", (int(mask.sum()),))

    def restore(
        self,
        meta: dict[str, object],
        tensors: dict[str, torch.Tensor],
        prefix: str,
        edits_per_group: int,
    ) -> None:
        """Load what `state` and `tensors` wrote; the count of edits in the current
        group follows from the merges done (every merged group was full)."""
        self.delta.copy_(tensors[f"{prefix}.delta"])
        if f"{prefix}.keys" in tensors:
            self.keys = tensors[f"{prefix}.keys"].float().to(self.delta.device)
        if f"{prefix}.subject_keys" in tensors:
            self.subject_keys = tensors[f"{prefix}.subject_keys"].float().to(self.delta.device)
        self._masks = [tensors[f"{prefix}.mask.{j}"] for j in range(int(meta["masks"]))]
        self._shard_values = [
            tensors[f"{prefix}.shard.{j}"].to(self.delta.device) for j in range(int(meta["shards"]))
        ]
        self._epsilon = float(meta["epsilon"])
        self._edit_ids = [int(i) for i in meta["edit_ids"]]
        self._merges = int(meta["merges"])
        self._closed = bool(meta["closed"])
        self._group_edits = len(self._edit_ids) - self._merges * edits_per_group


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
        radius: float | None = 0.0,
        subject_tau: float = 0.0,
    ) -> None:
        super().__init__(base_layer)
        self.memories = nn.ModuleList()
        self.candidates = candidates  # 0: score every memory; k: those of the k nearest keys
        # > 0: a memory takes only rows this near (cosine) an edit key; None: not yet
        # calibrated by the editor, routes as 0
        self.radius = radius
        # > 0: the subject gate (`subject.py`), reading `routing.lower`; its centre (H,),
        # the neutral mean of that lower layer, is set by the editor with the first key
        self.subject_tau = subject_tau
        self.register_buffer("subject_centre", None, persistent=False)
        # every memory's keys joined, rebuilt when one of them is replaced (`_joined_keys`)
        self._index: _KeyIndex | None = None

    def new_memory(self) -> SideMemory:
        weight = self.weight
        memory = SideMemory(weight.shape, weight.device)
        self.memories.append(memory)
        return memory

    def scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Activation score of every sequence against every memory: (M, B)."""
        return torch.stack([m.scores(acts, token_mask) for m in self.memories])

    def thresholds(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([m.epsilon for m in self.memories], device=device)

    def key_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Every edit's key (E, I) and the memory it lives in (E,)."""
        index = self._joined_keys(device)
        return index.keys, index.owners

    def _joined_keys(self, device: torch.device) -> _KeyIndex:
        """Every memory's keys joined (and normalised), once, and kept while no memory's
        ``keys`` tensor has been replaced: the index holds those tensors, so identity is
        a safe test. At T = 3000 joining and normalising 600 memories' keys on every
        forward cost ~15 ms."""
        current = [m.keys for m in self.memories]
        index = self._index
        if (
            index is None
            or index.keys.device != device
            or len(index.sources) != len(current)
            or any(kept is not now for kept, now in zip(index.sources, current))
        ):
            owners = [torch.full((len(k),), i, dtype=torch.long) for i, k in enumerate(current)]
            keys = torch.cat([k.to(device) for k in current])
            unit = F.normalize(keys.float(), dim=-1)
            index = _KeyIndex(current, keys, unit, torch.cat(owners).to(device))
            self._index = index
        return index

    def route(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Top-1 memory whose score clears its own threshold (Algorithm 2), -1 for none,
        or the memory of an edit whose prompt this sequence repeats (`route_sparse`).
        With ``candidates`` and more memories than that, only the memories of each
        sequence's nearest edit keys are scored (exactly); the rest cannot win. Within
        the key radius only."""
        if not len(self.memories):
            return unrouted(acts)
        candidates, similarity = self._candidates(acts, token_mask, self.radius or 0.0)
        score = self._scorer(acts, token_mask)
        choice = route_sparse(candidates, score, self.thresholds(acts.device), similarity)
        if self.subject_tau > 0 and self.subject_centre is not None:
            lower = self.routing.lower
            if lower is None or lower.shape[:2] != token_mask.shape:
                raise RuntimeError(
                    "the subject gate found no lower-layer states of this sequence; "
                    "was the model run without its editor's hooks?"
                )
            states = centred_unit(lower, self.subject_centre)
            keys = [m.subject_keys for m in self.memories]
            choice = subject_gate(choice, states, token_mask, keys, self.subject_tau)
        return choice

    def _dense(self) -> bool:
        return not self.candidates or len(self.memories) <= self.candidates

    def _candidates(
        self, acts: torch.Tensor, token_mask: torch.Tensor, radius: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's candidate memories (B, k) and their keys' cosines: the memories of
        its ``candidates`` nearest edit keys, or every memory (nearest first) when dense."""
        index = self._joined_keys(acts.device)
        queries = F.normalize(mean_inputs(acts, token_mask).float(), dim=-1)  # (B, I)
        k = len(index.keys) if self._dense() else self.candidates
        return unit_candidates(queries, index.unit, index.owners, k, radius)

    def _scorer(
        self, acts: torch.Tensor, token_mask: torch.Tensor
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def score(memory: int, rows: torch.Tensor) -> torch.Tensor:
            return self.memories[memory].scores(acts[rows], token_mask[rows])

        return score

    def route_scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor | None:
        """Each row's best activation score over the memories routing would score for it
        (the paper's Fig. 3): every memory when dense; with the retrieval index, those of
        its nearest edit keys (whatever the key radius), so that a report at T = 3000 does
        not score 600 memories per prompt (dense, a bench's report there was still in its
        second of four prompt groups after 52 minutes)."""
        if not len(self.memories):
            return None
        if self._dense():
            return self.scores(acts, token_mask).max(dim=0).values
        candidates, _ = self._candidates(acts, token_mask, radius=0.0)
        return candidate_scores(candidates, self._scorer(acts, token_mask)).max(dim=1).values

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
            delta = self.memories[index].delta
            out[rows] = base[rows] + value_change(x[rows], delta).to(base.dtype)
        return out
