"""The memory bank: where the next edit goes in Merge and Retrieve mode, which earlier
edits it replays (earlier memories only) and rehearses (its own memory), seeded."""

import torch
from torch import nn

from wise_edit import WiseConfig
from wise_edit.wise.bank import MemoryBank
from wise_edit.wise.layer import WiseLayer


def bank_of(**settings):
    layer = WiseLayer(nn.Linear(3, 2, bias=False))
    config = WiseConfig.from_settings(**{"shards.mask_ratio": 1.0, **settings})
    return MemoryBank(layer, config)


def fold(bank, edit_id):
    """Fold a zero step for ``edit_id`` where the bank plans it."""
    plan = bank.plan()
    memory = bank.memory_for(plan)
    zero = torch.zeros(3)

    def acts_of(ids):
        return torch.ones(len(ids), 1, 3), torch.ones(len(ids), 1)

    bank.fold(memory, plan, edit_id, torch.zeros(2, 3), (zero, zero[:2]), acts_of)
    return plan


def test_merge_keeps_one_open_memory_and_retrieve_opens_one_per_group():
    merge = bank_of(**{"shards.size": 2, "shards.per_merge": 1})
    plans = [fold(merge, i) for i in range(5)]
    assert [p.memory for p in plans] == [0, 0, 0, 0, 0] and len(merge.memories) == 1
    assert [p.new_memory for p in plans] == [True, False, False, False, False]
    retrieve = bank_of(**{"shards.size": 2, "shards.per_merge": 1, "memory.mode": "retrieve"})
    plans = [fold(retrieve, i) for i in range(5)]
    assert [p.memory for p in plans] == [0, 0, 1, 1, 2]
    assert [m.closed for m in retrieve.memories] == [True, True, False]
    assert retrieve.holding(3) == 1 and retrieve.holding(9) is None


def test_replay_draws_from_earlier_memories_only_and_rehearsal_from_its_own():
    bank = bank_of(
        **{"shards.size": 2, "shards.per_merge": 1, "memory.mode": "retrieve"},
        **{"memory.replay": True, "memory.replay_rows": 3, "memory.rehearse_rows": 1},
    )
    for i in range(5):
        fold(bank, i)
    plan = bank.plan()  # the next edit joins memory 2, next to edit 4
    replayed = bank.replay_ids(plan, 5)
    assert len(replayed) == 3 and set(replayed) <= {0, 1, 2, 3}
    assert bank.replay_ids(plan, 5) == replayed  # seeded by the edit's index
    assert bank.rehearsal_ids(plan, 5) == [4]
    first = bank.plan_in(bank.memories[0], 0)
    assert bank.replay_ids(first, 5) == []  # memory 0 has no earlier memory
    assert bank_of().replay_ids(plan, 5) == []  # replay off (merge mode)
