"""The service's edit log and worker in process: an edit's subject travels from the
request to the editor, and a log written before the subject column existed still opens."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import fast_config, tiny_model, tiny_tokenizer

from wise_edit import WiseEditor
from wise_edit.serve.log import EditLog
from wise_edit.serve.schema import BadRequest, Limits, edits
from wise_edit.serve.service import LOG_FILE, EditService

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


def test_a_request_may_name_the_subject_its_prompt_names():
    limits = Limits()
    body = {"prompt": PROMPT, "target": TARGET, "subject": SUBJECT}
    assert edits(body, limits) == [body]
    with pytest.raises(BadRequest, match="does not occur") as err:
        edits([body, {**body, "subject": "Helsinki"}], limits)
    assert err.value.param == "[1].subject"
    with pytest.raises(BadRequest) as err:
        edits({**body, "subject": 3}, limits)
    assert err.value.param == "subject"


def test_the_worker_hands_the_subject_to_the_editor(tmp_path):
    editor = WiseEditor(tiny_model(), tiny_tokenizer(), fast_config())
    service = EditService(tmp_path / "state", editor, checkpoint_every=1)
    service.start()
    try:
        with_subject, without = service.submit(
            [{"prompt": PROMPT, "target": TARGET, "subject": SUBJECT},
             {"prompt": "What is the capital of Atlantis?", "target": "Poseidonia"}]
        )  # fmt: skip
        assert service.wait_idle(120)
        assert service.log.get(with_subject)["subject"] == SUBJECT
        assert "subject" not in service.log.get(without)
        assert [e.get("subject") for e in editor.edit_log] == [SUBJECT, None]
    finally:
        service.stop()


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
