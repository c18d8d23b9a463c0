"""The service's worker in process: an edit's subject travels from the request to the
editor."""

from conftest import EDITS, fast_config, tiny_model, tiny_tokenizer

from wise_edit import WiseEditor
from wise_edit.serve.service import EditService

PROMPT, TARGET, SUBJECT = "Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall"


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


def _one_per_memory_editor():
    from editors import make

    return make(
        "wise-compact",
        **{"shard_size": 1, "memory.replay": True, "prefixes.per_step": 1, "max_steps": 8},
    )


def test_queued_edits_are_made_together(tmp_path):
    editor = _one_per_memory_editor()
    service = EditService(tmp_path / "state", editor, checkpoint_every=2, batch=4)
    service.start()
    try:
        ids = service.submit([{"prompt": p, "target": t} for p, t in EDITS[:3]])
        assert service.wait_idle(300)
        assert [service.log.get(i)["status"] for i in ids] == ["applied"] * 3
        assert [e["batch"] for e in editor.edit_log] == [3, 3, 3]
        assert [e["meta"]["id"] for e in editor.edit_log] == ids
    finally:
        service.stop()


def test_a_bad_edit_in_a_group_fails_alone(tmp_path):
    editor = _one_per_memory_editor()
    service = EditService(tmp_path / "state", editor, checkpoint_every=1, batch=4)
    service.start()
    try:
        records = [{"prompt": p, "target": t} for p, t in EDITS[:3]]
        records[1]["target"] = " "  # the editor refuses a blank target
        ids = service.submit(records)
        assert service.wait_idle(300)
        statuses = [service.log.get(i)["status"] for i in ids]
        assert statuses == ["applied", "failed", "applied"]
        assert [e.get("batch") for e in editor.edit_log] == [None, None]
    finally:
        service.stop()


def test_an_editor_that_cannot_batch_is_served_one_edit_at_a_time(tmp_path):
    editor = WiseEditor(tiny_model(), tiny_tokenizer(), fast_config())  # shared memories
    assert EditService(tmp_path / "state", editor, batch=8).batch == 1
