"""An edit that names its subject: the subject must be in the prompt, is kept in the log,
and keys the edit for the subject gate the same way after a reload or a retraction."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor, load_editor
from wise_edit.core.persistence import SaveFolder
from wise_edit.data import read_jsonl
from wise_edit.stream import StreamError, apply_stream

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


def test_a_subject_the_prompt_does_not_name_is_refused_before_any_change(tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(subject_layer=1))
    with pytest.raises(ValueError, match="does not occur"):
        editor.edit(PROMPT, TARGET, subject="Louis Vola")
    with pytest.raises(TypeError, match="non-empty string"):
        editor.edit(PROMPT, TARGET, subject="")
    assert editor.num_edits == 0 and not editor.memories


def test_retraction_and_reload_key_the_same_subjects(tokenizer, tmp_path):
    """The subject is in the log, so a rebuild keys each edit as it was: retracting an
    edit equals a stream that never had it, also after a reload."""
    config = fast_config(mode="merge", shard_size=1, max_steps=10, subject_layer=1)
    stream = [
        {"prompt": PROMPT, "target": TARGET, "subject": SUBJECT},
        {"prompt": EDITS[1][0], "target": EDITS[1][1], "subject": "Atlantis"},
        {"prompt": EDITS[3][0], "target": EDITS[3][1], "subject": "the Book of Sand"},
    ]
    editor = WiseEditor(tiny_model(), tokenizer, config)
    editor.edit_many(stream)
    editor.save_pretrained(tmp_path / "s")
    again = load_editor(tiny_model(), tokenizer, tmp_path / "s")
    assert [e["subject"] for e in again.edit_log] == [r["subject"] for r in stream]
    again.retract(1)
    never = WiseEditor(tiny_model(), tokenizer, config)
    never.edit_many([stream[0], stream[2]])
    assert torch.equal(again.memories[0].delta, never.memories[0].delta)
    assert torch.equal(again.memories[0].subject_keys, never.memories[0].subject_keys)
    # and the subjects matter: without them the edits are keyed by nothing (zeros)
    plain = WiseEditor(tiny_model(), tokenizer, config)
    plain.edit_many([(r["prompt"], r["target"]) for r in (stream[0], stream[2])])
    assert not plain.memories[0].subject_keys.any() and never.memories[0].subject_keys.any()


def test_a_stream_line_whose_subject_is_not_in_its_prompt_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "edits.jsonl"
    lines = [
        {"prompt": PROMPT, "target": TARGET, "subject": SUBJECT},
        {"prompt": EDITS[1][0], "target": EDITS[1][1], "subject": "Louis Vola"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(subject_layer=1))
    with SaveFolder(tmp_path / "out") as folder, pytest.raises(StreamError, match="line 2"):
        apply_stream(editor, folder, path, read_jsonl(path), 1, progress=False)
    assert editor.num_edits == 1 and editor.edit_log[0]["subject"] == SUBJECT
