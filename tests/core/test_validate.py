"""A save is data from disk: a corrupted one is refused naming the file and the key, and
nothing is attached to the model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model
from safetensors.torch import load_file, save_file

from wise_edit import WiseEditor
from wise_edit.core.persistence import STATE_FILE, TENSOR_FILE, CorruptSaveError


def _saved_editor(tokenizer, folder: Path, edits=EDITS[:2]) -> WiseEditor:
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=3))
    editor.edit_many(edits)
    editor.save_pretrained(folder)
    return editor


# ---------------------------------------------------------------------- loading
def _corrupt_state(folder: Path, change) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    change(state)
    (folder / STATE_FILE).write_text(json.dumps(state))


def _corrupt_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / TENSOR_FILE))
    change(tensors)
    save_file(tensors, str(folder / TENSOR_FILE))
    # keep the recorded checksum right, so that the content check is what fails
    from wise_edit.core.persistence import _sha256

    _corrupt_state(folder, lambda s: s.update(tensor_sha256=_sha256(folder / TENSOR_FILE)))


CORRUPTIONS = {
    "truncated tensor file": (
        lambda f: (f / TENSOR_FILE).write_bytes((f / TENSOR_FILE).read_bytes()[:100]),
        "editor_model.safetensors: contents do not match",
    ),
    "bytes changed": (
        lambda f: (f / TENSOR_FILE).write_bytes((f / TENSOR_FILE).read_bytes()[:-8] + b"\x00" * 8),
        "contents do not match the sha256",
    ),
    "missing key": (
        lambda f: _corrupt_tensors(f, lambda t: t.pop("memories.0.delta")),
        "memories.0.delta is missing",
    ),
    "wrong shape": (
        lambda f: _corrupt_tensors(f, lambda t: t.update({"memories.0.delta": torch.zeros(1, 64)})),
        "memories.0.delta has shape (1, 64), expected (32, 64)",
    ),
    "NaN delta": (
        lambda f: _corrupt_tensors(
            f, lambda t: t.update({"memories.0.delta": torch.full((32, 64), float("nan"))})
        ),
        "memories.0.delta holds NaN",
    ),
    "int tensor": (
        lambda f: _corrupt_tensors(
            f, lambda t: t.update({"memories.0.delta": torch.zeros(32, 64, dtype=torch.int32)})
        ),
        "memories.0.delta must be floating point",
    ),
    "extra tensor": (
        lambda f: _corrupt_tensors(f, lambda t: t.update({"evil": torch.zeros(1)})),
        "evil is not a tensor this method saves",
    ),
    "edit id out of range": (
        lambda f: _corrupt_state(f, lambda s: s["memories"][0].update(edit_ids=[0, 7])),
        "memories[0].edit_ids must be edit indices below 2",
    ),
    "an edit in the log that no memory holds": (
        lambda f: _corrupt_state(
            f, lambda s: s["edit_log"].append({**s["edit_log"][0], "index": 2})
        ),
        "edit_log[2] is an edit that none of the memories holds",
    ),
    "a retracted edit still held": (
        lambda f: _corrupt_state(f, lambda s: s["edit_log"][1].update(retracted={"seconds": 1})),
        "memories hold edit 1, which the edit_log marks retracted",
    ),
    "string score_scale": (
        lambda f: _corrupt_state(f, lambda s: s.update(score_scale="88")),
        "score_scale must be an integer or a number, got str",
    ),
    "missing field": (
        lambda f: _corrupt_state(f, lambda s: s.pop("memories")),
        "memories is missing",
    ),
    "bad JSON": (
        lambda f: (f / STATE_FILE).write_text("{not json"),
        "unreadable JSON",
    ),
    "bad config value": (
        lambda f: (f / "editor_config.json").write_text(
            (f / "editor_config.json").read_text().replace('"lr": 0.01', '"lr": "fast"')
        ),
        "WiseConfig.lr='fast': must be a number",
    ),
    "missing state file": (lambda f: (f / STATE_FILE).unlink(), "missing editor_state.json"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupted_save_is_refused_naming_file_and_key(name, tokenizer, tmp_path):
    damage, message = CORRUPTIONS[name]
    folder = tmp_path / "s"
    _saved_editor(tokenizer, folder)
    damage(folder)
    model = tiny_model()
    with pytest.raises(CorruptSaveError) as err:
        WiseEditor.from_pretrained(model, tokenizer, folder)
    assert message in str(err.value)
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"  # nothing attached


# ---------------------------------------------------------------------- edits held
def test_an_edit_that_no_memory_holds_is_refused():
    """The generic half of a method's check (WISE: `check_saved_memories` passes the edit
    ids its memories hold): a log of 4 with 3 held is corrupt, not 4 edits."""
    from wise_edit.core.validate import SaveChecker

    check = SaveChecker("s", {})
    log = [{"index": i} for i in range(4)]
    with pytest.raises(CorruptSaveError, match=r"edit_log\[3\] is an edit that none of"):
        check.edits_held(log, {0, 1, 2}, "memories")
    log[3]["retracted"] = {"steps": 0}
    check.edits_held(log, {0, 1, 2}, "memories")  # retracted: rightly held by none
    with pytest.raises(CorruptSaveError, match="hold edit 3, which the edit_log marks retracted"):
        check.edits_held(log, {0, 1, 2, 3}, "memories")
