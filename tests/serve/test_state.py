"""Starting `wise-edit serve` on a state folder: what is refused before anything is
written (files wise-edit did not create, a junk log, settings that differ from the
checkpoint, a checkpoint the log never wrote), and what is put right from the log (a
checkpoint a crash left mid-swap, or one that is gone)."""

from __future__ import annotations

import shutil

import pytest
import uvicorn
from conftest import EDITS
from serving import InProcess, flags

from wise_edit.cli import main
from wise_edit.serve.service import CHECKPOINT_DIR, LOG_FILE


@pytest.fixture(autouse=True)
def no_serving(monkeypatch):
    """A start-up that is not refused must not block the test in uvicorn."""

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)


def refused(model_dir, state, capsys, *extra: str) -> str:
    """`wise-edit serve` on ``state``: exit status 2 and its one-line error (after,
    at most, the model's loading bar)."""
    capsys.readouterr()  # what came before
    assert main(["serve", *flags(model_dir, state, 0, 2, *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("wise-edit: error:"), err
    return err.splitlines()[-1]


def served(model_dir, state, count: int = 2) -> list[int]:
    """A state folder whose log holds ``count`` applied edits, checkpointed on the way
    out; their ids."""
    server = InProcess(model_dir, state, checkpoint_every=100)
    try:
        ids = server.edit(*({"prompt": p, "target": t} for p, t in EDITS[:count]))
        for i in ids:
            server.wait_for(i, "applied")
    finally:
        server.stop()
    return ids


@pytest.mark.parametrize("where", ["state", "checkpoint"])
def test_a_folder_holding_user_files_is_refused_and_kept(model_dir, tmp_path, capsys, where):
    state = tmp_path / "state"
    folder = state if where == "state" else state / CHECKPOINT_DIR
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "sub").mkdir()
    err = refused(model_dir, state, capsys)
    assert "did not create" in err and "notes.txt" in err
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "sub").is_dir()


def test_a_junk_log_is_a_one_line_error(model_dir, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / LOG_FILE).write_bytes(b"not a database " * 100)
    assert "not a wise-edit edit log" in refused(model_dir, state, capsys)


@pytest.mark.parametrize("flag", [["--set", "max_steps=5"], ["--mode", "merge"]])
def test_settings_that_differ_from_the_checkpoint_are_refused(model_dir, tmp_path, capsys, flag):
    state = tmp_path / "state"
    served(model_dir, state, count=1)
    err = refused(model_dir, state, capsys, *flag)
    assert "differ from the checkpoint" in err and flag[1].split("=")[0] in err


def test_a_checkpoint_left_mid_swap_is_recovered_before_it_loads(model_dir, tmp_path):
    state = tmp_path / "state"
    ids = served(model_dir, state)
    # killed between the swap's two renames: the save is only under its side name
    (state / CHECKPOINT_DIR).rename(state / f".{CHECKPOINT_DIR}.old-4242")
    server = InProcess(model_dir, state)
    try:
        assert server.service.editor.num_edits == len(ids)
        assert server.service.wait_idle(60)
        metrics = server.client.get("/metrics").json()
        assert metrics["editor"]["edits_in_log"] == len(ids)  # none applied twice
        assert metrics["edits"]["applied"] == len(ids)
    finally:
        server.stop()
    assert not list(state.glob(f".{CHECKPOINT_DIR}.old-*"))


def test_a_checkpoint_that_is_gone_is_rebuilt_from_the_log(model_dir, tmp_path):
    state = tmp_path / "state"
    ids = served(model_dir, state)
    shutil.rmtree(state / CHECKPOINT_DIR)
    server = InProcess(model_dir, state)
    try:
        for i in ids:
            server.wait_for(i, "applied")
        editor = server.service.editor
        assert [e["prompt"] for e in editor.edit_log] == [p for p, _ in EDITS[: len(ids)]]
        assert server.client.get("/metrics").json()["edits"]["applied"] == len(ids)
    finally:
        server.stop()


def test_a_checkpoint_the_log_never_accepted_is_refused(model_dir, tmp_path, capsys):
    state = tmp_path / "state"
    served(model_dir, state)
    (state / LOG_FILE).unlink()  # a new log would give its first edit id 1 again
    assert "never accepted" in refused(model_dir, state, capsys)
