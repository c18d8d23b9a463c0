"""`wise-edit serve` as a user starts it: a real process on loopback that takes one edit,
answers one completion with it, and shuts down cleanly on Ctrl-C with its edit in the
checkpoint. (The HTTP API itself is tested in process, in test_app.py.)"""

from __future__ import annotations

import shutil
import sys

from conftest import EDITS, tiny_model, tiny_tokenizer
from serving import Server, library_answers

from wise_edit import load_editor
from wise_edit.serve.service import EditService


def test_a_served_edit_is_answered_and_kept_over_a_clean_shutdown(model_dir, tmp_path):
    script = shutil.which("wise-edit")
    launcher = [script] if script else [sys.executable, "-m", "wise_edit.cli"]
    state = tmp_path / "state"
    server = Server(model_dir, state, launcher=launcher, checkpoint_every=100)
    try:
        prompt, target = EDITS[0]
        (edit_id,) = server.edit({"prompt": prompt, "target": target})
        server.wait_for(edit_id, "applied")
        answer = server.complete(prompt)
        assert answer["text"] == library_answers([EDITS[0]], [prompt])[prompt]
        assert answer["wise_memory"] == 0
    finally:
        status = server.stop()
    assert status == 0, server.log.read_text()
    # the last checkpoint, written on the way out, holds the edit
    saved = load_editor(tiny_model(), tiny_tokenizer(), EditService.checkpoint_path(state))
    assert saved.num_edits == 1 and saved.edit_log[0]["prompt"] == prompt
