"""The subject gate: a side memory answers only sequences that name one of its edits'
subjects (keyed low in the model), and edits without a subject leave it ungated."""

from __future__ import annotations

import pytest
import torch
from conftest import EDITS, as_format_2, fast_config, tiny_model

from wise_edit import WiseEditor
from wise_edit.core.layer import AttachedLayer
from wise_edit.wise.router import centred_unit, subject_end, subject_gate

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"
OTHER = "Who designed Tokyo Tower?"  # the same question about another subject


def test_subject_end_is_the_last_token_of_the_last_occurrence(tokenizer):
    ids = tokenizer("Hall of Lahti Town Hall? Yes", add_special_tokens=False)["input_ids"]
    at = subject_end(tokenizer, ids, SUBJECT)
    assert tokenizer.decode(ids[: at + 1]).endswith("Lahti Town Hall")
    assert not tokenizer.decode(ids[at + 1 :]).startswith(" Hall")
    assert subject_end(tokenizer, ids, "Eliel Saarinen") is None


def test_centred_unit_removes_the_centre_then_scales_to_one():
    states = torch.tensor([[4.0, 1.0], [1.0, 5.0]])
    out = centred_unit(states, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_the_gate_keeps_a_memory_only_where_a_token_names_one_of_its_subjects():
    keys = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])]
    states = torch.tensor(
        [
            [[0.0, 1.0], [0.8, 0.6]],  # names memory 0's subject (cosine .8)
            [[0.0, 1.0], [1.0, 0.0]],  # would, but that token is masked out
            [[1.0, 0.0], [1.0, 0.0]],  # memory 1 holds an edit without a subject
            [[1.0, 0.0], [1.0, 0.0]],  # routed nowhere
            [[0.6, 0.8], [0.0, 1.0]],  # cosine .6 with memory 0's subject
        ]
    )
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1]])
    choice = torch.tensor([0, 0, 1, -1, 0])
    assert subject_gate(choice, states, mask, keys, 0.7).tolist() == [0, -1, 1, -1, -1]
    assert subject_gate(choice, states, mask, keys, 0.5).tolist() == [0, -1, 1, -1, 0]


def _open_gate_editor(tokenizer, family: str = "llama", **overrides) -> WiseEditor:
    """One edit of PROMPT naming its subject, its memory's threshold pushed below every
    score so that routing alone would send any prompt to it: what is left is the gate."""
    config = fast_config(key_radius=0.0, max_steps=3, **overrides)
    editor = WiseEditor(tiny_model(family, seed=3), tokenizer, config)
    editor.edit(PROMPT, TARGET, subject=SUBJECT)
    editor.memories[0]._epsilon = 0.0
    return editor


def test_a_memory_answers_its_subject_and_not_the_same_question_about_another(tokenizer):
    editor = _open_gate_editor(tokenizer)
    assert editor.routed([PROMPT, OTHER]) == [0, -1]
    batch = tokenizer([PROMPT, OTHER], return_tensors="pt", padding=True)
    with torch.no_grad():
        editor(**batch)  # the forward decides as `routed` does
    assert editor.last_decision() == [0, -1]
    assert _open_gate_editor(tokenizer, subject_tau=0.0).routed([PROMPT, OTHER]) == [0, 0]


def test_every_family_hands_the_gate_its_lower_layer(tokenizer, family):
    # a random tiny model's low states are not very subject-like: a strict tau, which the
    # edit prompt's own subject token (cosine 1) still passes
    editor = _open_gate_editor(tokenizer, family, subject_tau=0.95)
    assert editor.routed([PROMPT, OTHER]) == [0, -1]


def test_an_edit_without_a_subject_leaves_its_memory_ungated(tokenizer):
    editor = _open_gate_editor(tokenizer, shard_size=2, shards_per_merge=1)
    editor.edit(*EDITS[0])  # no subject, same memory
    assert editor.memories[0].subject_keys[1].abs().sum() == 0
    assert editor.routed([PROMPT, OTHER]) == [0, 0]


def test_subject_keys_survive_a_save_and_are_rebuilt_for_older_saves(tokenizer, tmp_path):
    editor = _open_gate_editor(tokenizer)
    editor.save_pretrained(tmp_path / "s")
    loaded = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    assert torch.equal(loaded.memories[0].subject_keys, editor.memories[0].subject_keys)
    assert torch.equal(loaded.layer.subject_centre, editor.layer.subject_centre)
    as_format_2(tmp_path / "s", drop=("subject_keys", "subject_centre"))
    old = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    torch.testing.assert_close(old.memories[0].subject_keys, editor.memories[0].subject_keys)


def test_a_save_from_before_the_gate_routes_without_it(tokenizer, tmp_path):
    editor = _open_gate_editor(tokenizer)
    editor.save_pretrained(tmp_path / "s")
    as_format_2(tmp_path / "s", drop=("subject_tau", "subject_layer", "subject_keys"))
    old = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    assert old.config.routing.subject_tau == 0.0
    assert old.routed([PROMPT, OTHER]) == [0, 0]


def test_a_subject_layer_above_the_edited_one_is_refused_and_nothing_is_attached(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="subject_layer"):
        WiseEditor(model, tokenizer, fast_config(subject_layer=3))
    assert not any(isinstance(m, AttachedLayer) for m in model.modules())
    assert all(not layer._forward_hooks for layer in model.model.layers)


def test_an_editor_of_the_first_layer_has_no_gate_by_default(tokenizer):
    editor = WiseEditor(tiny_model("llama"), tokenizer, fast_config(layer=0, max_steps=3))
    editor.edit(PROMPT, TARGET, subject=SUBJECT)
    assert editor.layer.subject_tau == 0.0 and editor.layer.subject_centre is None
    assert editor.memories[0].subject_keys.abs().sum() == 0
