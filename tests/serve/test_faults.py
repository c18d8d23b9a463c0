"""The service under storage faults, in process: a checkpoint that fails for a full disk
(an injected ENOSPC), a log that is full, the state folder removed while serving. The
worker survives, /health says what fails (503), writes are refused (507/503, the OpenAI
error shape) until edits can be made durable, and every accepted edit ends up applied
exactly once."""

from __future__ import annotations

import errno
import shutil
import time

from conftest import EDITS
from serving import InProcess

from wise_edit.core import persistence


def _wait(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _refused(response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] == "server_error"
    return error["message"]


def test_a_full_disk_at_checkpoint_keeps_the_worker_and_the_edits(model_dir, tmp_path, monkeypatch):
    state = tmp_path / "state"
    server = InProcess(model_dir, state, checkpoint_every=1)
    real = persistence._write_files

    def disk_full(folder, saved):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        monkeypatch.setattr(persistence, "_write_files", disk_full)
        first, second = server.edit(*({"prompt": p, "target": t} for p, t in EDITS[:2]))
        server.wait_for(first, "applied")
        _wait(lambda: server.client.get("/health").status_code == 503)
        health = server.client.get("/health").json()
        assert health["status"] == "failing" and "No space left" in health["error"]["message"]
        body = {"prompt": EDITS[2][0], "target": EDITS[2][1]}
        message = _refused(server.client.post("/v1/edits", json=body, headers=server.auth), 507)
        assert "No space left" in message
        assert server.service._worker.is_alive()
        assert server.client.get(f"/v1/edits/{second}").json()["status"] == "pending"

        monkeypatch.setattr(persistence, "_write_files", real)  # space again
        _wait(lambda: server.client.get("/health").status_code == 200, timeout=30)
        server.wait_for(second, "applied")
        (third,) = server.edit(body)
        server.wait_for(third, "applied")
        assert server.service.wait_idle(60)
        assert server.service.editor.num_edits == 3
    finally:
        monkeypatch.setattr(persistence, "_write_files", real)
        server.stop()
    again = InProcess(model_dir, state)
    try:
        assert again.service.wait_idle(60)
        assert again.service.editor.num_edits == 3  # each applied exactly once
        assert [e["prompt"] for e in again.service.editor.edit_log] == [p for p, _ in EDITS[:3]]
    finally:
        again.stop()


def test_a_full_log_is_a_507_and_accepts_nothing(model_dir, tmp_path):
    server = InProcess(model_dir, tmp_path / "state")
    try:
        db = server.service.log._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        body = [{"prompt": p * 40, "target": t} for p, t in EDITS]
        response = server.client.post("/v1/edits", json=body, headers=server.auth)
        assert "full" in _refused(response, 507)
        db.execute("PRAGMA max_page_count = 1073741823")
        assert server.client.get("/v1/edits").json()["data"] == []
    finally:
        server.stop()


def test_a_state_folder_removed_while_serving_refuses_writes(model_dir, tmp_path):
    state = tmp_path / "state"
    server = InProcess(model_dir, state)
    try:
        shutil.rmtree(state)
        body = {"prompt": EDITS[0][0], "target": EDITS[0][1]}
        message = _refused(server.client.post("/v1/edits", json=body, headers=server.auth), 503)
        assert "removed" in message
        health = server.client.get("/health")
        assert health.status_code == 503 and "removed" in health.json()["error"]["message"]
        assert server.complete(EDITS[0][0])  # reading still works
    finally:
        server.stop()
