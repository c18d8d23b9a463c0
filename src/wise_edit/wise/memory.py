"""One side memory (§2.2): W_v' = W_v + delta, a copy of the value matrix that alone is
edited, with everything that belongs to it.

Its tensors are registered buffers, so that a save is its ``state_dict()`` and a load is
``load_state_dict(strict=True)`` into a memory built with the saved sizes (`sized`):
- ``delta`` (O, I): what the memory adds to the value matrix;
- ``keys`` (E, I): one per edit, the mean value-matrix input of its prompt (the
  retrieval index, `router.py`);
- ``subject_keys`` (E, O): one per edit, the subject gate's key (zeros: not gated);
- ``masks`` (S, O, I) and ``shard_values`` (N,): the current merge group's shard masks
  and, compactly, the masked entries each started shard has learned (empty between
  groups; `shards.py` trains and merges them).
A compact memory (``rank`` r > 0) keeps, instead of ``delta`` and the shards, ``up``
(O, E r) and ``down`` (E r, I): each edit is trained as a rank-r product and appended, so
a memory costs (O + I) r floats per edit rather than O I per memory. A trained dense
delta is not low-rank (Adam spreads it over the whole matrix), so the compact form has to
be what is trained, not a compression of it afterwards.
The rest (threshold, edits held, merges done, closed, rank) is small JSON (`meta`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.persistence import STATE_FILE
from ..core.validate import SaveChecker
from .router import Change, Factors, sequence_scores, threshold

if TYPE_CHECKING:
    from .config import WiseConfig


class SideMemory(nn.Module):
    """The editor decides where an edit goes (`bank.py`); the memory folds it in
    (`add_edit`), merges its shards (`merge`) and refreshes its threshold."""

    def __init__(
        self, shape: torch.Size | tuple[int, int], device: torch.device, rank: int = 0
    ) -> None:
        super().__init__()
        out_dim, in_dim = shape
        self.rank = rank  # per edit; 0: a dense delta
        if rank:
            self.register_buffer("up", torch.zeros((out_dim, 0), device=device))
            self.register_buffer("down", torch.zeros((0, in_dim), device=device))
        else:
            self.register_buffer("delta", torch.zeros((out_dim, in_dim), device=device))
            self.register_buffer("masks", torch.zeros((0, out_dim, in_dim), dtype=torch.bool))
            self.register_buffer("shard_values", torch.zeros(0, device=device))
        self.register_buffer("keys", torch.zeros((0, in_dim), device=device))
        self.register_buffer("subject_keys", torch.zeros((0, out_dim), device=device))
        self._shard_sizes: list[int] = []  # entries of each started shard in shard_values
        self._epsilon = float("inf")  # routing threshold; inf until the memory holds an edit
        self._edit_ids: list[int] = []  # indices into the editor's edit log
        self._merges = 0  # merge groups completed
        self._group_edits = 0  # edits since the last merge
        self._closed = False  # retrieve mode: no further edits after its merge

    @classmethod
    def sized(
        cls, shape: torch.Size, device: torch.device, meta: dict[str, Any], per_group: int
    ) -> SideMemory:
        """An empty memory with the buffer sizes ``meta`` (from `meta`) names, ready for
        ``load_state_dict(strict=True)``, and its JSON state restored."""
        memory = cls(shape, device, int(meta.get("rank", 0)))
        edits = len(meta["edit_ids"])
        memory.keys = memory.keys.new_zeros((edits, shape[1]))
        memory.subject_keys = memory.subject_keys.new_zeros((edits, shape[0]))
        if memory.rank:
            memory.up = memory.up.new_zeros((shape[0], edits * memory.rank))
            memory.down = memory.down.new_zeros((edits * memory.rank, shape[1]))
        else:
            memory.masks = memory.masks.new_zeros((int(meta["masks"]), *shape))
            memory.shard_values = memory.shard_values.new_zeros(sum(meta["shard_sizes"]))
            memory._shard_sizes = [int(n) for n in meta["shard_sizes"]]
        # None: a memory without edits (all retracted), whose threshold is infinite
        memory._epsilon = float("inf") if meta["epsilon"] is None else float(meta["epsilon"])
        memory._edit_ids = [int(i) for i in meta["edit_ids"]]
        memory._merges = int(meta["merges"])
        memory._closed = bool(meta["closed"])
        # every merged group was full, so the open group's count follows
        memory._group_edits = edits - memory._merges * per_group
        return memory

    def meta(self) -> dict[str, Any]:
        """The JSON half of a save (the tensors are the ``state_dict``)."""
        return {
            # JSON has no infinity: a memory without edits (all retracted) writes None
            "epsilon": self._epsilon if math.isfinite(self._epsilon) else None,
            "edit_ids": list(self._edit_ids),
            "merges": self._merges,
            "closed": self._closed,
            "masks": 0 if self.rank else len(self.masks),
            "shard_sizes": list(self._shard_sizes),
            "rank": self.rank,
        }

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
    def shard_count(self) -> int:
        return len(self._shard_sizes)

    def shard_vector(self, shard: int) -> torch.Tensor:
        """Dense task vector of a shard of the current group (zeros outside its mask)."""
        start = sum(self._shard_sizes[:shard])
        values = self.shard_values[start : start + self._shard_sizes[shard]]
        full = torch.zeros_like(self.delta)
        full[self.masks[shard].to(full.device)] = values
        return full

    @property
    def change(self) -> Change:
        """What the memory adds to the value matrix: ``delta``, or its `Factors`."""
        return Factors(self.up, self.down) if self.rank else self.delta

    def scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Activation score of each sequence against this memory: (B,)."""
        return sequence_scores(acts, self.change, token_mask)

    # ------------------------------------------------------------------ changes
    def add_edit(
        self,
        edit_id: int,
        shard: int,
        step: torch.Tensor,
        group_masks: Sequence[torch.Tensor],
        key: torch.Tensor,
        subject_key: torch.Tensor,
    ) -> None:
        """Fold an edit's trained ``step`` (dense, zero outside the shard's mask) into the
        served delta and into its shard, or (compact) append its `Factors`, and index it by
        its ``key`` (I,) and ``subject_key`` (O,). ``group_masks`` are taken when a group
        starts. Key tensors are replaced, never changed in place: the layer's index knows
        it is current by the tensors' identity."""
        if isinstance(step, Factors):
            self.up = torch.cat([self.up, step.up.to(self.up)], dim=1)
            self.down = torch.cat([self.down, step.down.to(self.down)], dim=0)
        else:
            self._add_dense(shard, step, group_masks)
        self.keys = torch.cat([self.keys, key.float().view(1, -1).to(self.keys.device)])
        row = subject_key.float().view(1, -1).to(self.subject_keys.device)
        self.subject_keys = torch.cat([self.subject_keys, row])
        self._edit_ids.append(edit_id)
        self._group_edits += 1

    def _add_dense(
        self, shard: int, step: torch.Tensor, group_masks: Sequence[torch.Tensor]
    ) -> None:
        if not len(self.masks):
            self.masks = torch.stack([m.cpu() for m in group_masks])
        while len(self._shard_sizes) <= shard:
            count = int(self.masks[len(self._shard_sizes)].sum())
            grown = torch.zeros(count, device=self.delta.device)
            self.shard_values = torch.cat([self.shard_values, grown])
            self._shard_sizes.append(count)
        self.delta += step
        start = sum(self._shard_sizes[:shard])
        end = start + self._shard_sizes[shard]
        self.shard_values[start:end] += step[self.masks[shard].to(self.delta.device)]

    def replace_delta(self, delta: torch.Tensor, close: bool) -> None:
        """After a merge (`shards.merge_group`): the merged delta; the group's shards
        are dropped. ``close``: take no further edits (retrieve mode)."""
        self.delta.copy_(delta)
        self.masks = self.masks[:0]
        self.shard_values = self.shard_values[:0]
        self._shard_sizes = []
        self.end_group(close)

    def end_group(self, close: bool) -> None:
        """A full group is done: merged (dense), or simply kept as it is (compact: one
        shard of products, whose merge is the identity)."""
        self._merges += 1
        self._group_edits = 0
        self._closed = close

    def close(self) -> None:
        """Take no further edits (retrieve mode: a compact memory is closed, unmerged, when
        full; a rebuilt memory keeps being closed)."""
        self._closed = True

    def refresh_threshold(self, acts: torch.Tensor, token_mask: torch.Tensor, ratio: float) -> None:
        """epsilon from the prompt activations (N, T, I) of all edits the memory holds now:
        later edits and merges move the scores of earlier ones, so a threshold frozen at
        edit time would drop them."""
        self._epsilon = threshold(self.scores(acts, token_mask), ratio)


def check_saved_memories(
    check: SaveChecker, state: dict[str, Any], config: WiseConfig, shape: torch.Size
) -> None:
    """Check what `SideMemory.meta` and the ``state_dict`` wrote for every memory against
    the config and the model (``shape``: the wrapped matrix), and that no edit is held
    twice or outside the log."""
    memories = check.field(state, "memories", list)
    edits, per_group = len(state["edit_log"]), config.edits_per_memory()
    held: set[int] = set()
    for i, meta in enumerate(memories):
        where, prefix = f"memories[{i}]", f"memories.{i}"
        check.field({where: meta}, where, dict)
        ids = check.field(meta, "edit_ids", list)
        if any(not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < edits for e in ids):
            check.fail(STATE_FILE, f"{where}.edit_ids", f"must be edit indices below {edits}")
        if held & set(ids) or len(set(ids)) != len(ids):
            check.fail(STATE_FILE, f"{where}.edit_ids", "repeats an edit")
        held |= set(ids)
        # a memory whose edits were all retracted routes nothing: no threshold (None, or
        # infinity as JSON's non-standard Infinity)
        emptied = not ids and meta.get("epsilon", 0.0) in (None, float("inf"))
        if not emptied:
            check.number(meta, "epsilon", low=0.0)
        merges = check.integer(meta, "merges")
        if not 0 <= len(ids) - merges * per_group < max(1, per_group):
            check.fail(STATE_FILE, f"{prefix}: edit_ids", f"do not fit {merges} merges")
        check.field(meta, "closed", bool)
        rank = check.integer(meta, "rank") if "rank" in meta else 0  # older saves: dense
        if rank != config.memory.rank:
            check.fail(STATE_FILE, f"{where}.rank", f"must be memory.rank={config.memory.rank}")
        for name, width in (("keys", shape[1]), ("subject_keys", shape[0])):
            if f"{prefix}.{name}" in check.tensors:  # older saves predate them
                check.tensor(f"{prefix}.{name}", (len(ids), width))
        if rank:
            check.tensor(f"{prefix}.up", (shape[0], len(ids) * rank))
            check.tensor(f"{prefix}.down", (len(ids) * rank, shape[1]))
            continue
        masks = check.integer(meta, "masks", high=config.shards.per_merge)
        sizes = check.field(meta, "shard_sizes", list)
        if len(sizes) > masks or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in sizes
        ):
            check.fail(STATE_FILE, f"{where}.shard_sizes", f"must be at most {masks} sizes")
        check.tensor(f"{prefix}.delta", shape, bound=config.memory.norm_bound)
        mask = check.tensor(f"{prefix}.masks", (masks, *shape), kind="bool")
        if [int(m.sum()) for m in mask[: len(sizes)]] != sizes:
            check.fail(STATE_FILE, f"{where}.shard_sizes", "do not match the masks")
        check.tensor(f"{prefix}.shard_values", (sum(sizes),))
    check.edits_held(state["edit_log"], held, "memories")


def load_memories(
    layer: Any,
    metas: list[dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    per_group: int,
    derive: dict[str, Callable[[Sequence[int]], torch.Tensor]],
) -> None:
    """Append the saved memories to ``layer.memories``, built with the saved sizes and
    filled through ``load_state_dict(strict=True)``; a key tensor the save predates
    (``keys``, ``subject_keys``) is made by ``derive[name](edit_ids)``."""
    weight = layer.weight
    for meta in metas:
        layer.memories.append(SideMemory.sized(weight.shape, weight.device, meta, per_group))
    state = {
        k.removeprefix("memories."): v for k, v in tensors.items() if k.startswith("memories.")
    }
    for i, memory in enumerate(layer.memories):
        for name, make in derive.items():
            if f"{i}.{name}" not in state:
                state[f"{i}.{name}"] = (
                    make(memory.edit_ids) if memory.edit_ids else getattr(memory, name)
                )
    layer.memories.load_state_dict(state, strict=True)
