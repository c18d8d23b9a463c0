"""The side memories as a bank (§2.3 and Appendix B.3): where the next edit goes, which
earlier edits it trains again, and what happens when a memory's group of shards is full.

WISE-Merge keeps one memory whose full groups are merged into it and which stays open.
WISE-Retrieve closes a memory after its merge and opens a new one for the next edit;
with `replay`, an edit is trained to stay below alpha on a sample of earlier memories'
edits (L_memo). With `rehearse_rows`, an edit also trains a sample of the earlier edits
of its own memory again, so that later edits do not overwrite them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..core.seeds import mask_generator, merge_generator, rehearsal_generator, replay_generator
from .config import WiseConfig
from .layer import WiseLayer
from .memory import SideMemory
from .merging import get_merge
from .router import Acts, Change
from .shards import merge_group, random_masks


@dataclass
class Plan:
    """Where the next edit goes; nothing is changed until the edit succeeds."""

    memory: int
    new_memory: bool
    shard: int
    masks: list[torch.Tensor]  # the merge group's masks (new ones if the group starts now)
    base: Change  # what the memory adds before this edit
    held: tuple[int, ...] = ()  # edits the memory already holds


class MemoryBank:
    """The layer's side memories under one config: plans edits and folds them in."""

    def __init__(self, layer: WiseLayer, config: WiseConfig) -> None:
        self.layer, self.config = layer, config

    @property
    def memories(self) -> Sequence[SideMemory]:
        return self.layer.memories  # type: ignore[return-value]

    def holding(self, edit_id: int) -> int | None:
        """The memory that holds ``edit_id`` (None: none, e.g. a retracted edit)."""
        return next((i for i, m in enumerate(self.memories) if edit_id in m.edit_ids), None)

    def plan(self) -> Plan:
        """The next edit goes to the last memory, or to a new one if that is closed."""
        memories = self.memories
        last = memories[-1] if len(memories) else None
        if last is None or last.closed:
            return self.plan_in(None, len(memories))
        return self.plan_in(last, len(memories) - 1)

    def check_batchable(self) -> None:
        """Edits can train together only where each takes a new memory of its own: in a
        shared memory an edit would train over the others' unfinished steps."""
        cfg = self.config
        if cfg.memory.mode != "retrieve" or cfg.edits_per_memory() != 1:
            raise ValueError(
                "edits train together only when each takes a side memory of its own "
                "(memory.mode=retrieve, shards.size=1, shards.per_merge=1, as in the "
                f"defaults); this config puts {cfg.edits_per_memory()} edits in a "
                f"{cfg.memory.mode} memory: edit with batch 1"
            )

    def plans(self, count: int) -> list[Plan]:
        """Plans of ``count`` edits trained together, each in a new memory."""
        self.check_batchable()
        first = self.plan()
        if not first.new_memory:  # a one-edit memory closes with its edit
            raise ValueError(f"side memory {first.memory} is still open: edit with batch 1")
        return [first] + [self.plan_in(None, first.memory + j) for j in range(1, count)]

    def plan_in(self, memory: SideMemory | None, number: int) -> Plan:
        """The next edit of memory ``number`` (``memory`` None: one that starts now)."""
        if memory is None:
            memory = SideMemory(self.layer.weight.shape, self.layer.weight.device, self.layer.rank)
            return replace(self.plan_in(memory, number), new_memory=True)
        shard = memory.group_edits // self.config.shards.size
        masks = [] if memory.rank else list(memory.masks)
        if not memory.rank and not masks:
            masks = self._group_masks(number, memory.merges)
        return Plan(number, False, shard, masks, memory.change, tuple(memory.edit_ids))

    def _group_masks(self, memory: int, group: int) -> list[torch.Tensor]:
        shards = self.config.shards
        gen = mask_generator(self.config.seed, memory, group)
        return random_masks(self.layer.weight.shape, shards.mask_ratio, shards.per_merge, gen)

    def replay_ids(self, plan: Plan, index: int, pending: Sequence[int] = ()) -> list[int]:
        """Edits of earlier memories that edit ``index`` keeps out of its own (a seeded
        sample of `replay_rows`; none without replay). ``pending``: the edits trained
        together with it that come before it, each in a memory of its own not made yet."""
        if not self.config.memory.replay:  # validated: only in retrieve mode
            return []
        ids = [i for m in list(self.memories)[: plan.memory] for i in m.edit_ids]
        ids += list(pending)
        if not ids:
            return []
        gen = replay_generator(self.config.seed, index)
        picks = torch.randperm(len(ids), generator=gen)[: self.config.memory.replay_rows]
        return [ids[i] for i in picks.tolist()]

    def rehearsal_ids(self, plan: Plan, index: int) -> list[int]:
        """Earlier edits of the memory that edit ``index`` goes to, trained again with it
        (a seeded sample of at most `rehearse_rows`, in their order)."""
        k = self.config.memory.rehearse_rows
        if not k or not plan.held:
            return []
        held = list(plan.held)
        if len(held) > k:
            picks = torch.randperm(
                len(held), generator=rehearsal_generator(self.config.seed, index)
            )
            held = [held[i] for i in sorted(picks[:k].tolist())]
        return held

    def memory_for(self, plan: Plan) -> SideMemory:
        return self.layer.new_memory() if plan.new_memory else self.memories[plan.memory]

    def fold(
        self,
        memory: SideMemory,
        plan: Plan,
        edit_id: int,
        step: Change,
        keys: tuple[torch.Tensor, torch.Tensor],
        acts_of: Callable[[Sequence[int]], Acts],
    ) -> None:
        """Add trained edit ``edit_id`` (its ``step`` and its key and subject key) to
        ``memory``; merge when the group is full (Eq. 8), closing the memory in retrieve
        mode; then epsilon over every edit the memory holds, from ``acts_of`` their
        prompt activations."""
        cfg = self.config
        memory.add_edit(edit_id, plan.shard, step, plan.masks, *keys)
        close = cfg.memory.mode == "retrieve"
        if memory.group_edits == cfg.edits_per_memory():
            if memory.rank:  # one shard of products: its merge is the identity
                memory.end_group(close)
            else:
                merge_group(
                    memory,
                    get_merge(cfg.shards.merge_method),
                    density=cfg.shards.merge_density,
                    generator=merge_generator(cfg.seed, plan.memory, memory.merges),
                    norm_bound=cfg.memory.norm_bound,
                    close=close,
                )
        memory.refresh_threshold(*acts_of(memory.edit_ids), cfg.routing.threshold_ratio)
