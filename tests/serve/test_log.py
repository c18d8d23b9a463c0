"""The service's edit log and worker in process: an edit's subject travels from the
request to the editor, and a log written before the subject column existed still opens."""

from __future__ import annotations

import sqlite3

from wise_edit.serve.log import EditLog
from wise_edit.serve.service import LOG_FILE

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


def test_a_log_from_before_subjects_opens_with_its_edits(tmp_path):
    path = tmp_path / LOG_FILE
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE edits (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT NOT NULL, "
        "target TEXT NOT NULL, rephrase TEXT, status TEXT NOT NULL DEFAULT 'pending', "
        "error TEXT, memory INTEGER, steps INTEGER, seconds REAL, "
        "retract_requested INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL);"
        "INSERT INTO edits (prompt, target, created) VALUES ('old prompt', 'old target', 1.0);"
    )
    old.commit()
    old.close()
    log = EditLog(path)
    try:
        assert log.get(1) == {
            "id": 1, "prompt": "old prompt", "target": "old target", "status": "pending",
            "retract_requested": False, "created": 1.0,
        }  # fmt: skip
        (new,) = log.add_edits([{"prompt": PROMPT, "target": TARGET, "subject": SUBJECT}])
        assert log.get(new)["subject"] == SUBJECT
    finally:
        log.close()
    EditLog(path).close()  # a second open finds the column and adds nothing
