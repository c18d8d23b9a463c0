"""Subject-swapped negatives: an edit that names its subject is also trained to leave
its own prompt, rewritten about other subjects, unanswered."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor, load_editor
from wise_edit.core.persistence import SaveFolder
from wise_edit.data import read_jsonl
from wise_edit.neutral import NEUTRAL_SUBJECTS, swap_subject
from wise_edit.stream import StreamError, apply_stream

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


def test_swap_subject_rewrites_every_occurrence_whatever_its_case():
    prompt = "This is a passage about carole gist. Carole Gist (born 1969) was"
    assert swap_subject(prompt, "carole gist", ["Tokyo", "the Danube"]) == [
        "This is a passage about Tokyo. Tokyo (born 1969) was",
        "This is a passage about the Danube. the Danube (born 1969) was",
    ]
    with pytest.raises(ValueError, match="does not occur"):
        swap_subject(prompt, "Louis Vola", ["Tokyo"])
    with pytest.raises(ValueError, match="non-empty"):
        swap_subject(prompt, " ", ["Tokyo"])


def _captured_prompts(monkeypatch) -> list[list[str]]:
    """Every prompt batch the editor runs through the lower layers."""
    seen: list[list[str]] = []
    original = WiseEditor._prompt_batch_acts

    def spy(self, prompts):
        seen.append(list(prompts))
        return original(self, prompts)

    monkeypatch.setattr(WiseEditor, "_prompt_batch_acts", spy)
    return seen


def test_an_edit_that_names_its_subject_trains_against_it_swapped(tokenizer, monkeypatch):
    # (no subject gate: its key would read the edit's own prompt through the same spy)
    config = fast_config(subject_negatives=3, subject_tau=0.0)
    editor = WiseEditor(tiny_model(), tokenizer, config)
    seen = _captured_prompts(monkeypatch)
    editor.edit(PROMPT, TARGET, subject=SUBJECT)
    swapped = [p for batch in seen for p in batch if p.startswith("Who designed ")]
    assert len(swapped) == 3 and PROMPT not in swapped
    others = {p.removeprefix("Who designed ").removesuffix("?") for p in swapped}
    assert others <= set(NEUTRAL_SUBJECTS)
    assert editor.edit_log[0]["subject"] == SUBJECT

    seen.clear()  # an edit without a subject draws none; nor does the default config
    editor.edit(*EDITS[1])
    assert not [p for batch in seen for p in batch if "capital of" in p]
    assert "subject" not in editor.edit_log[1]
    assert WiseEditor.config_class().subject_negatives == 0


def test_a_subject_the_prompt_does_not_name_is_refused_before_any_change(tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(subject_negatives=2))
    with pytest.raises(ValueError, match="does not occur"):
        editor.edit(PROMPT, TARGET, subject="Louis Vola")
    with pytest.raises(TypeError, match="non-empty string"):
        editor.edit(PROMPT, TARGET, subject="")
    assert editor.num_edits == 0 and not editor.memories


def test_retraction_and_reload_retrain_with_the_same_swaps(tokenizer, tmp_path):
    """The subject is in the log, so a rebuild draws the same swapped prompts: retracting
    an edit equals a stream that never had it, also after a reload."""
    config = fast_config(mode="merge", shard_size=1, max_steps=10, subject_negatives=2)
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
    # and the swaps matter: the same stream without subjects trains another memory
    plain = WiseEditor(tiny_model(), tokenizer, config)
    plain.edit_many([(r["prompt"], r["target"]) for r in (stream[0], stream[2])])
    assert not torch.equal(plain.memories[0].delta, never.memories[0].delta)


def test_a_stream_line_whose_subject_is_not_in_its_prompt_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "edits.jsonl"
    lines = [
        {"prompt": PROMPT, "target": TARGET, "subject": SUBJECT},
        {"prompt": EDITS[1][0], "target": EDITS[1][1], "subject": "Louis Vola"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(subject_negatives=1))
    with SaveFolder(tmp_path / "out") as folder, pytest.raises(StreamError, match="line 2"):
        apply_stream(editor, folder, path, read_jsonl(path), 1, progress=False)
    assert editor.num_edits == 1 and editor.edit_log[0]["subject"] == SUBJECT
