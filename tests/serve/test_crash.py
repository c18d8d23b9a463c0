"""SIGKILL the server while edits are pending, and while a checkpoint is being written;
after a restart every accepted edit is applied exactly once and the answers equal those
of an uninterrupted run. SIGTERM stops it with a last checkpoint, as Ctrl-C does."""

from __future__ import annotations

import signal
import sys
import time

import pytest
from conftest import EDITS, tiny_model, tiny_tokenizer
from serving import Server, library_answers

from wise_edit import load_editor
from wise_edit.serve.service import EditService

# Runs the CLI with the checkpoint writer stopping, after writing the new save beside the
# old one and before swapping it in, once the save holds $SLOW_AFTER edits: the test kills
# the process there.
LAUNCHER = """
import os, pathlib, sys, time
from wise_edit.core import persistence
real = persistence._write_files
def held(folder, saved):
    real(folder, saved)
    if len(saved.state["edit_log"]) >= int(os.environ["SLOW_AFTER"]):
        pathlib.Path(os.environ["MARK"]).write_text(str(folder))
        time.sleep(120)
persistence._write_files = held
from wise_edit.cli import main
sys.exit(main())
"""

PROMPTS = [p for p, _ in EDITS] + ["Please remember to close the door when you leave the room."]


@pytest.fixture(scope="module")
def uninterrupted():
    return library_answers(EDITS, PROMPTS)


def _wait(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("moment", ["edits pending", "checkpoint being written"])
def test_sigkill_then_restart_applies_every_edit_once(model_dir, tmp_path, uninterrupted, moment):
    state = tmp_path / "state"
    mark = tmp_path / "mark"
    launcher = None
    if moment == "checkpoint being written":
        (tmp_path / "launch.py").write_text(LAUNCHER)
        launcher = [sys.executable, str(tmp_path / "launch.py")]
    extra_env = {"SLOW_AFTER": "2", "MARK": str(mark)}
    first = Server(model_dir, state, launcher=launcher, extra_env=extra_env)
    ids = first.edit(*({"prompt": p, "target": t} for p, t in EDITS))
    status = lambda: [first.client.get(f"/v1/edits/{i}").json()["status"] for i in ids]  # noqa: E731
    if launcher is None:
        _wait(lambda: "applied" in status())
    else:
        _wait(mark.exists)
    statuses = status()
    first.kill()
    assert "pending" in statuses  # killed with work outstanding
    if launcher is not None:  # the new save was written but not swapped in
        assert list(state.glob(".checkpoint.tmp-*"))

    second = Server(model_dir, state)
    try:
        for i in ids:
            second.wait_for(i, "applied")
        editor = second.client.get("/metrics").json()["editor"]
        assert editor["edits_in_log"] == len(EDITS)  # each edit applied exactly once
        for prompt in PROMPTS:
            assert second.complete(prompt)["text"] == uninterrupted[prompt], prompt
    finally:
        second.stop()
    assert not list(state.glob(".checkpoint.tmp-*"))  # the next checkpoint cleaned up


def test_sigterm_checkpoints_like_ctrl_c_and_a_restart_applies_each_edit_once(model_dir, tmp_path):
    """What `docker stop`, systemd and Kubernetes send: the last checkpoint is written."""
    state = tmp_path / "state"
    first = Server(model_dir, state, checkpoint_every=100)
    prompt, target = EDITS[0]
    try:
        (edit_id,) = first.edit({"prompt": prompt, "target": target})
        first.wait_for(edit_id, "applied")
    finally:
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=60) == 0, first.log.read_text()
        first.client.close()
    saved = load_editor(tiny_model(), tiny_tokenizer(), EditService.checkpoint_path(state))
    assert [e["prompt"] for e in saved.edit_log] == [prompt]  # in the last checkpoint

    second = Server(model_dir, state)
    try:
        assert second.wait_for(edit_id, "applied")
        assert second.client.get("/metrics").json()["editor"]["edits_in_log"] == 1
    finally:
        second.stop()
