"""Edits trained together (`edit_many` with ``batch``): the same edits as sequential ones."""

import pytest
import torch
from conftest import EDITS, tiny_chat_tokenizer, tiny_model
from editors import SETUPS, make

from wise_edit import WiseEditor

# the defaults' shape on a tiny model: one compact memory per edit, replay, one
# prefixed row per forward
ONE_PER_MEMORY = {
    "shard_size": 1,
    "memory.replay": True,
    "memory.replay_rows": 3,
    "prefixes.per_step": 1,
    "prefix_count": 3,
}


def _pair(**overrides):
    settings = {**ONE_PER_MEMORY, **overrides}
    return make("wise-compact", **settings), make("wise-compact", **settings)


def _same_edits(alone, together, rel=5e-3):
    """The same memories up to the rounding of a larger batch, which Adam's first steps
    (a step of lr whatever the gradient's size) carry into the weights at ~1e-3."""
    assert len(alone.memories) == len(together.memories)
    for a, b in zip(alone.memories, together.memories):
        assert a.edit_ids == b.edit_ids and a.closed and b.closed
        x, y = a.change.dense(), b.change.dense()
        assert (x - y).norm() <= rel * x.norm()
        assert a.epsilon == pytest.approx(b.epsilon, rel=rel)
    strip = ("seconds", "loss", "lm_loss", "batch")
    for x, y in zip(alone.edit_log, together.edit_log):
        assert {k: v for k, v in x.items() if k not in strip} == {
            k: v for k, v in y.items() if k not in strip
        }
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-5)


def test_edits_together_equal_edits_one_at_a_time():
    alone, together = _pair()
    records = [{"prompt": p, "target": t} for p, t in EDITS[:5]]
    sequential = alone.edit_many(records)
    batched = together.edit_many(records, batch=3)  # a group of 3, then one of 2
    assert [r.steps for r in sequential] == [r.steps for r in batched]
    assert [e["batch"] for e in together.edit_log] == [3, 3, 3, 2, 2]
    _same_edits(alone, together)
    prompts = [p for p, _ in EDITS[:5]] + ["The weather today is mild and calm."]
    assert alone.routed(prompts) == together.routed(prompts)
    a, b = alone.activation_scores(prompts), together.activation_scores(prompts)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_edits_together_in_the_chat_format_share_the_header():
    settings = {**ONE_PER_MEMORY, "prompt_format": "chat"}
    cls, config = SETUPS["wise-compact"]
    alone, together = (
        cls(tiny_model(), tiny_chat_tokenizer(), config(**settings)) for _ in range(2)
    )
    assert alone.format.kind == "chat"
    records = [(p, t) for p, t in EDITS[:4]]
    assert [r.steps for r in alone.edit_many(records)] == [
        r.steps for r in together.edit_many(records, batch=4)
    ]
    _same_edits(alone, together)


def test_a_batch_continues_a_stream_and_saves_like_one(tmp_path):
    alone, together = _pair()
    for editor in (alone, together):
        editor.edit(*EDITS[0])
    alone.edit_many(EDITS[1:4])
    together.edit_many(EDITS[1:4], batch=8)
    _same_edits(alone, together)
    prompts = [p for p, _ in EDITS[:4]]
    routed = together.routed(prompts)
    together.save_pretrained(tmp_path / "save")
    model = together.detach()
    loaded = WiseEditor.from_pretrained(model, together.tokenizer, tmp_path / "save")
    assert [e.get("batch") for e in loaded.edit_log] == [None, 3, 3, 3]
    assert loaded.routed(prompts) == routed == [0, 1, 2, 3]


def test_memories_that_take_several_edits_refuse_a_batch():
    editor = make("wise-compact")  # two edits per memory
    with pytest.raises(ValueError, match="side memory of its own"):
        editor.edit_many(EDITS[:2], batch=2)
    assert editor.num_edits == 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch must be None or an int"):
            make("wise-compact", **ONE_PER_MEMORY).edit_many(EDITS[:2], batch=bad)


def test_a_failing_edit_leaves_the_whole_group_out(monkeypatch):
    editor = make("wise-compact", **ONE_PER_MEMORY)
    editor.edit(*EDITS[0])
    before = (len(editor.memories), dict(editor._prompt_acts), list(editor.edit_log))
    import wise_edit.core.fastpath as fastpath

    real = fastpath.target_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(fastpath, "target_loss", poisoned)
    with pytest.raises(FloatingPointError):
        editor.edit_many(EDITS[1:4], batch=3)
    assert len(editor.memories) == before[0] and editor.edit_log == before[2]
    assert editor._prompt_acts.keys() == before[1].keys()
    with pytest.raises(TypeError):  # a bad record fails before anything trains
        editor.edit_many([EDITS[1], ("fine", 3)], batch=2)
    assert editor.num_edits == 1
