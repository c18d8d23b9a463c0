"""The service's worker in process: an edit's subject travels from the request to the
editor."""

from conftest import fast_config, tiny_model, tiny_tokenizer

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
