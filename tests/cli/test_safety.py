"""Nothing lost, nothing destroyed: saves never go over what is not ours, streams resume
without applying anything twice, loaded state is checked, config and text are typed,
and routing holds one decision per prompt with or without a KV cache."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model
from safetensors.torch import load_file, save_file

from wise_edit import WiseConfig, WiseEditor, load_editor
from wise_edit.baselines import GraceConfig, GraceEditor
from wise_edit.cli import main
from wise_edit.core.persistence import (
    STATE_FILE,
    TENSOR_FILE,
    CorruptSaveError,
    ForeignFolderError,
    SaveFolder,
    SaveLockedError,
)

FAST = ["--set", "max_steps=3", "--set", "prefix_count=1", "--set", "prefix_lengths=[2]"]


def _jsonl(path: Path, edits) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in edits))
    return path


def _edit(model_dir, edits_file, out, *extra):
    argv = ["edit", "--model", model_dir, "--edits", str(edits_file), "--out", str(out)]
    return main([*argv, "--data-dir", str(out.parent), *FAST, *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _saved_editor(tokenizer, folder: Path, edits=EDITS[:2]) -> WiseEditor:
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=3))
    editor.edit_many(edits)
    editor.save_pretrained(folder)
    return editor


# ---------------------------------------------------------------------- never destroy
def test_a_save_never_goes_over_a_foreign_folder(tokenizer, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my thesis")
    (foreign / "sub").mkdir()
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(foreign)
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=2))
    with pytest.raises(ForeignFolderError, match="holds no wise-edit save"):
        editor.save_pretrained(foreign)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ForeignFolderError, match="is a file"):
        editor.save_pretrained(file)
    assert _tree(foreign) == before and file.read_text() == "x"


def test_another_methods_save_is_replaced_only_when_asked(tokenizer, tmp_path):
    _saved_editor(tokenizer, tmp_path / "s")
    grace = GraceEditor(tiny_model(), tokenizer, GraceConfig(layer=2, max_steps=2))
    with pytest.raises(ForeignFolderError, match="holds a WISE save"):
        grace.save_pretrained(tmp_path / "s")
    grace.save_pretrained(tmp_path / "s", replace=True)
    assert isinstance(load_editor(tiny_model(), tokenizer, tmp_path / "s"), GraceEditor)


def test_cli_refuses_a_foreign_out_before_any_work(model_dir, tmp_path, capsys):
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    before = _tree(Path(model_dir))
    assert _edit(model_dir, edits, Path(model_dir)) == 2  # --out = the model folder
    err = capsys.readouterr().err
    assert "holds no wise-edit save" in err and "Traceback" not in err
    assert _tree(Path(model_dir)) == before
    (tmp_path / "file").write_text("keep")
    assert _edit(model_dir, edits, tmp_path / "file") == 2
    assert (tmp_path / "file").read_text() == "keep"


def test_cli_rerun_without_resume_is_refused_and_force_replaces(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _edit(model_dir, _jsonl(tmp_path / "a.jsonl", EDITS[:3]), out) == 0
    one = _jsonl(tmp_path / "b.jsonl", EDITS[3:4])
    assert _edit(model_dir, one, out) == 2
    assert "--resume continues it, --force replaces it" in capsys.readouterr().err
    assert json.loads((out / STATE_FILE).read_text())["edit_log"][2]["prompt"] == EDITS[2][0]
    assert _edit(model_dir, one, out, "--force") == 0
    assert len(json.loads((out / STATE_FILE).read_text())["edit_log"]) == 1


# ---------------------------------------------------------------------- streams
def _log(out: Path) -> list[dict]:
    return json.loads((out / STATE_FILE).read_text())["edit_log"]


def test_resume_never_applies_a_record_twice(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:2])
    assert _edit(model_dir, edits, out) == 0
    assert _edit(model_dir, edits, out, "--resume") == 0  # the same file again
    assert [e["prompt"] for e in _log(out)] == [p for p, _ in EDITS[:2]]
    assert "2 record(s) of e.jsonl are already in" in capsys.readouterr().out
    _jsonl(edits, EDITS[:4])  # two lines appended
    assert _edit(model_dir, edits, out, "--resume") == 0
    log = _log(out)
    assert [e["prompt"] for e in log] == [p for p, _ in EDITS[:4]]
    assert [e["meta"]["line"] for e in log] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_record_unless_asked(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:2])
    assert _edit(model_dir, edits, out) == 0
    _jsonl(edits, [EDITS[0], (EDITS[1][0], "Someone Else")])
    assert _edit(model_dir, edits, out, "--resume") == 2
    assert "line(s) 2 changed since they were applied" in capsys.readouterr().err
    assert len(_log(out)) == 2
    assert _edit(model_dir, edits, out, "--resume", "--reapply-changed") == 0
    assert [e["target"] for e in _log(out)] == [EDITS[0][1], EDITS[1][1], "Someone Else"]


def test_resume_with_other_settings_names_them(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, out) == 0
    assert _edit(model_dir, edits, out, "--resume", "--set", "lr=0.5") == 2
    assert "lr (save: 0.01, given: 0.5)" in capsys.readouterr().err
    assert _edit(model_dir, edits, out, "--resume", "--method", "grace") == 2
    assert "holds WISE edits" in capsys.readouterr().err
    assert _edit(model_dir, edits, out, "--resume", "--mode", "retrieve") == 2
    assert "mode (save: 'merge', given: 'retrieve')" in capsys.readouterr().err
    assert _edit(model_dir, edits, out, "--resume", "--set", "max_steps=3") == 0  # same value


def test_a_failing_record_names_its_line_and_keeps_the_edits_before(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    long_prompt = "Who " + "is it really " * 120 + "?"  # beyond the tiny model's 256 positions
    edits = _jsonl(tmp_path / "e.jsonl", [EDITS[0], EDITS[1], (long_prompt, "x"), EDITS[2]])
    assert _edit(model_dir, edits, out, "--checkpoint-every", "10") == 2
    err = capsys.readouterr().err
    assert "e.jsonl: line 3:" in err and "longer than the model's context" in err
    assert [e["prompt"] for e in _log(out)] == [p for p, _ in EDITS[:2]]
    _jsonl(edits, [EDITS[0], EDITS[1], ("Who is it?", "x"), EDITS[2]])  # fixed
    assert _edit(model_dir, edits, out, "--resume") == 0
    assert len(_log(out)) == 4


def test_a_second_writer_fails_fast(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    with SaveFolder(out):
        assert _edit(model_dir, edits, out) == 2
        assert "is being written by pid" in capsys.readouterr().err
        with pytest.raises(SaveLockedError), SaveFolder(out):
            pass
    assert _edit(model_dir, edits, out) == 0  # released


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
        lambda f: _corrupt_tensors(f, lambda t: t.pop("memory.0.delta")),
        "memory.0.delta is missing",
    ),
    "wrong shape": (
        lambda f: _corrupt_tensors(f, lambda t: t.update({"memory.0.delta": torch.zeros(1, 64)})),
        "memory.0.delta has shape (1, 64), expected (32, 64)",
    ),
    "NaN delta": (
        lambda f: _corrupt_tensors(
            f, lambda t: t.update({"memory.0.delta": torch.full((32, 64), float("nan"))})
        ),
        "memory.0.delta holds NaN",
    ),
    "int tensor": (
        lambda f: _corrupt_tensors(
            f, lambda t: t.update({"memory.0.delta": torch.zeros(32, 64, dtype=torch.int32)})
        ),
        "memory.0.delta must be floating point",
    ),
    "extra tensor": (
        lambda f: _corrupt_tensors(f, lambda t: t.update({"evil": torch.zeros(1)})),
        "evil is not a tensor this method saves",
    ),
    "edit id out of range": (
        lambda f: _corrupt_state(f, lambda s: s["memories"][0].update(edit_ids=[0, 7])),
        "memories[0].edit_ids must be edit indices below 2",
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


def test_cli_reports_a_corrupted_save_in_one_line(model_dir, tmp_path, capsys):
    folder = tmp_path / "s"
    assert _edit(model_dir, _jsonl(tmp_path / "e.jsonl", EDITS[:1]), folder) == 0
    (folder / STATE_FILE).write_text("[]")
    capsys.readouterr()
    assert main(["generate", "--model", model_dir, "--edits", str(folder), "Who?"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("wise-edit:")]
    assert "editor_state.json: expected a JSON object" in line


# ---------------------------------------------------------------------- config and text
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("lr=Infinity", "WiseConfig.lr=inf: must be finite"),
        ("max_steps=1.5", "WiseConfig.max_steps=1.5: must be an integer"),
        ("max_steps=abc", "WiseConfig.max_steps='abc': must be an integer"),
        ("replay=1", "WiseConfig.replay=1: must be true or false"),
        ("no_such=1", "unknown WiseConfig field(s): no_such"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(setting, message, model_dir, tmp_path, capsys):
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, tmp_path / "out", "--set", setting) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("wise-edit:")]
    assert message in line
    with pytest.raises(ValueError, match="must be finite"):
        WiseConfig(alpha=float("nan"))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("\x00", "has no visible characters"),
        ("\u200b\u200b", "has no visible characters"),
        ("\ud800abc", "not valid Unicode"),
        (" \t ", "target is empty"),
    ],
)
def test_targets_need_visible_valid_text(target, message, tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=2))
    with pytest.raises(ValueError, match=message):
        editor.edit("Who designed it?", target)
    assert editor.num_edits == 0 and not editor.memories


def test_generate_refuses_an_empty_prompt(model_dir, tmp_path, capsys):
    folder = tmp_path / "s"
    assert _edit(model_dir, _jsonl(tmp_path / "e.jsonl", EDITS[:1]), folder) == 0
    assert main(["generate", "--model", model_dir, "--edits", str(folder), ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------- routing
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_decision_per_prompt_without_a_kv_cache(family, tokenizer):
    editor = WiseEditor(tiny_model(family), tokenizer, fast_config(max_steps=25))
    editor.edit_many(EDITS[:2])
    decisions = []
    original = editor.layer.route
    editor.layer.route = lambda acts, mask: decisions.append(acts.shape[1]) or original(acts, mask)
    for prompt in [EDITS[0][0], "The weather today is mild and calm."]:
        batch = tokenizer([prompt], return_tensors="pt")
        decisions.clear()
        plain = editor.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
        assert decisions == [batch["input_ids"].shape[1]]  # decided once, from the prompt
        cached = editor.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(plain, cached)
    del editor.layer.route
