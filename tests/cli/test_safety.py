"""Nothing lost, nothing destroyed, from the command line: `edit --out` never goes over
what is not ours, streams resume without applying anything twice, a corrupted save and a
bad setting are one line and exit 2."""

import json
from pathlib import Path

import pytest
from conftest import EDITS

from wise_edit import WiseConfig
from wise_edit.cli import main
from wise_edit.core.persistence import (
    STATE_FILE,
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
    assert _edit(model_dir, edits, out, "--resume", "--mode", "merge") == 2
    assert "memory.mode (save: 'retrieve', given: 'merge')" in capsys.readouterr().err
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
        ("replay=1", "MemoryConfig.replay=1: must be true or false"),
        ("memory.replay=1", "MemoryConfig.replay=1: must be true or false"),
        ("no_such=1", "unknown WiseConfig setting 'no_such' (known: "),
        ("momentum=0.5", "momentum was removed"),
        ("seed=99999999999999999999999", "WiseConfig.seed=99999999999999999999999: must be"),
        ("seed=-1", "WiseConfig.seed=-1: must be between 0 and 4294967295"),
        ('target_module="model.layers.0.self_attn"', "'model.layers.0.self_attn' is a Llama"),
        ("prefix_lengths=[100000]", "prefixes.lengths: 100000 tokens do not fit"),
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
        WiseConfig.from_settings(alpha=float("nan"))


def test_generate_refuses_an_empty_prompt(model_dir, tmp_path, capsys):
    folder = tmp_path / "s"
    assert _edit(model_dir, _jsonl(tmp_path / "e.jsonl", EDITS[:1]), folder) == 0
    assert main(["generate", "--model", model_dir, "--edits", str(folder), ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------- issue 41
def _one_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("wise-edit:")]
    return line


def _mine(folder: Path) -> dict[str, bytes]:
    (folder / "notes.txt").write_text("my notes")
    (folder / "README.txt").write_text("what this save is")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return {k: v for k, v in _tree(folder).items() if not k.startswith("editor_")}


def test_resume_and_force_keep_the_users_files(model_dir, tmp_path):
    out = tmp_path / "out"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, out) == 0
    mine = _mine(out)
    _jsonl(edits, EDITS[:2])
    assert _edit(model_dir, edits, out, "--resume") == 0
    assert len(_log(out)) == 2
    assert {k: v for k, v in _tree(out).items() if k in mine} == mine
    assert _edit(model_dir, edits, out, "--force") == 0
    assert len(_log(out)) == 2
    assert {k: v for k, v in _tree(out).items() if k in mine} == mine


@pytest.mark.parametrize("name", [".out.lock", ".out.lock.owner"])
def test_a_lock_file_that_is_a_link_is_never_written_through(name, model_dir, tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("my thesis")
    (tmp_path / "lk").mkdir()
    (tmp_path / "lk" / name).symlink_to(precious)
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, tmp_path / "lk" / "out") == 2
    assert "is a symbolic link" in _one_line(capsys.readouterr().err)
    assert precious.read_text() == "my thesis"
    assert not (tmp_path / "lk" / "out").exists()


def test_resume_matches_records_by_content_not_file_name(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _edit(model_dir, _jsonl(tmp_path / "a.jsonl", EDITS[:2]), out) == 0
    renamed = _jsonl(tmp_path / "b.jsonl", EDITS[:2])  # the same records, another name
    assert _edit(model_dir, renamed, out, "--resume") == 0
    assert len(_log(out)) == 2
    said = capsys.readouterr().out
    assert "2 record(s) of b.jsonl are already in" in said and "line(s) 1-2" in said
    assert "applied from a.jsonl" in said
    longer = _jsonl(tmp_path / "c.jsonl", EDITS[:3])  # starts with the same lines
    assert _edit(model_dir, longer, out, "--resume") == 0
    assert [e["prompt"] for e in _log(out)] == [p for p, _ in EDITS[:3]]
    assert "2 record(s) of c.jsonl" in capsys.readouterr().out


def test_out_dot_is_refused_as_the_current_folder(model_dir, tmp_path, capsys, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, Path(".")) == 2
    line = _one_line(capsys.readouterr().err)
    assert "is the current folder" in line and "not empty" not in line
    assert list(here.iterdir()) == []


def test_a_rerun_over_another_methods_save_names_the_saves_method(model_dir, tmp_path, capsys):
    out = tmp_path / "s1"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, out) == 0
    assert _edit(model_dir, edits, out, "--method", "grace") == 2
    assert "s1 already holds a WISE save" in _one_line(capsys.readouterr().err)


def test_a_subject_key_is_known_not_warned(model_dir, tmp_path, caplog):
    edits = tmp_path / "e.jsonl"
    record = {"prompt": EDITS[0][0], "target": EDITS[0][1], "subject": "Lahti Town Hall"}
    edits.write_text(json.dumps(record) + "\n")
    assert _edit(model_dir, edits, tmp_path / "out") == 0
    assert "unknown key" not in caplog.text
    assert _log(tmp_path / "out")[0]["subject"] == "Lahti Town Hall"


def _change_saved_config(folder: Path, change) -> None:
    config = json.loads((folder / "editor_config.json").read_text())
    change(config)
    (folder / "editor_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c.update(target_module="model.layers.0.self_attn"),
            "'model.layers.0.self_attn' is a LlamaAttention",
        ),
        (
            lambda c: c["prefixes"].update(lengths=[1_000_000_000]),
            "prefixes.lengths: 1000000000 tokens do not fit",
        ),
    ],
)
def test_a_save_with_settings_the_model_cannot_take_is_one_line(
    change, message, model_dir, tmp_path, capsys
):
    folder = tmp_path / "s"
    edits = _jsonl(tmp_path / "e.jsonl", EDITS[:1])
    assert _edit(model_dir, edits, folder) == 0
    _change_saved_config(folder, change)
    capsys.readouterr()
    assert main(["generate", "--model", model_dir, "--edits", str(folder), "Who?"]) == 2
    assert message in _one_line(capsys.readouterr().err)
    _jsonl(edits, EDITS[:2])
    argv = ["edit", "--model", model_dir, "--edits", str(edits), "--out", str(folder)]
    assert main([*argv, "--resume", "--data-dir", str(tmp_path)]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_a_state_nested_too_deeply_is_one_line(model_dir, tmp_path, capsys):
    folder = tmp_path / "s"
    assert _edit(model_dir, _jsonl(tmp_path / "e.jsonl", EDITS[:1]), folder) == 0
    (folder / STATE_FILE).write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert main(["generate", "--model", model_dir, "--edits", str(folder), "Who?"]) == 2
    assert "nested too deeply" in _one_line(capsys.readouterr().err)
