"""WISE retraction: the retracted prompt is answered as by a model that never had the edit,
the other edits hold, the log says so. (GRACE's is in tests/baselines/test_grace.py; bad
ids and methods that cannot retract, in tests/core/test_editor_contract.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model
from editors import greedy, make, unedited

from wise_edit import WiseEditor, load_editor


def _wise_config(mode: str, rehearse: int = 0):
    return fast_config(
        mode=mode,
        shard_size=1,
        shards_per_merge=2,
        max_steps=20,
        rehearse_rows=rehearse,
        margin_weight=3.0,  # routing with room to spare on the tiny model
    )


def _wise(tokenizer, mode: str, rehearse: int = 0) -> WiseEditor:
    editor = WiseEditor(tiny_model(), tokenizer, _wise_config(mode, rehearse))
    editor.edit_many(EDITS[:4])
    return editor


def test_wise_retrieve_retraction_rebuilds_one_memory(tokenizer):
    editor = _wise(tokenizer, "retrieve")  # memories: [0, 1], [2, 3]
    before = {p: greedy(editor, tokenizer, p) for p, _ in EDITS[:4]}
    untouched = editor.memories[1].delta.clone()
    assert [editor.memory_holding(i) for i in range(4)] == [0, 0, 1, 1]
    prompt = EDITS[1][0]
    assert before[prompt] != unedited(tokenizer, prompt)  # the edit held

    cost = editor.retract(1)

    assert greedy(editor, tokenizer, prompt) == unedited(tokenizer, prompt)
    assert editor.routed([p for p, _ in EDITS[:4]]) == [0, -1, 1, 1]
    assert torch.equal(editor.memories[1].delta, untouched)
    for p, _ in EDITS[2:4]:
        assert greedy(editor, tokenizer, p) == before[p]
    assert editor.memories[0].edit_ids == (0,) and editor.memories[0].closed
    assert [editor.memory_holding(i) for i in range(4)] == [0, None, 1, 1]
    assert editor.edit_log[1]["retracted"] == cost and cost["retrained_edits"] == 1
    assert editor.live_edits() == [0, 2, 3]


@pytest.mark.parametrize("rehearse", [0, 2])
def test_wise_merge_retraction_equals_a_stream_without_the_edit(tokenizer, rehearse):
    editor = _wise(tokenizer, "merge", rehearse)
    cost = editor.retract(1)
    never = WiseEditor(tiny_model(), tokenizer, _wise_config("merge", rehearse))
    never.edit_many([EDITS[i] for i in (0, 2, 3)])
    assert torch.equal(editor.memories[0].delta, never.memories[0].delta)
    assert editor.thresholds == never.thresholds
    for p, _ in EDITS[:4]:
        assert greedy(editor, tokenizer, p) == greedy(never, tokenizer, p), p
    assert cost["retrained_edits"] == 3  # merge mode: every other edit


def test_retracted_wise_state_saves_loads_and_keeps_editing(tokenizer, tmp_path):
    editor = _wise(tokenizer, "retrieve")
    editor.retract(0)
    editor.save_pretrained(tmp_path / "s")
    again = load_editor(tiny_model(), tokenizer, tmp_path / "s")
    for p, _ in EDITS[:4]:
        assert greedy(again, tokenizer, p) == greedy(editor, tokenizer, p)
    assert again.edit_log[0]["retracted"]
    again.edit(*EDITS[4])
    assert again.routed([EDITS[4][0]]) == [len(again.memories) - 1]
    with pytest.raises(ValueError, match="already retracted"):
        again.retract(0)


def test_a_memory_emptied_by_retraction_saves_and_loads(tokenizer, tmp_path):
    # one edit per memory (the compact defaults): a retraction empties its memory, which
    # then has no threshold; the save must still load (JSON has no infinity)
    editor = make("wise-compact", **{"shards.size": 1, "max_steps": 5})
    editor.edit_many(EDITS[:2])
    tokenizer = editor.tokenizer
    editor.retract(0)
    assert editor.memories[0].edit_ids == () and editor.thresholds[0] == float("inf")
    editor.save_pretrained(tmp_path / "s")
    assert '"epsilon": null' in (tmp_path / "s" / "editor_state.json").read_text()
    again = load_editor(tiny_model(), tokenizer, tmp_path / "s")
    assert again.thresholds == editor.thresholds
    prompts = [p for p, _ in EDITS[:2]]
    assert again.routed(prompts) == editor.routed(prompts) and again.routed(prompts)[0] == -1
