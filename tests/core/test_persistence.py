"""The save format: fixed file names for every method, dispatch on the method key, saves
in the old layout, and the Editor protocol every method satisfies."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from wise_edit import Editor, WiseEditor, load_editor
from wise_edit.baselines import GraceConfig, GraceEditor
from wise_edit.core.persistence import CONFIG_FILE, STATE_FILE, TENSOR_FILE, saved_method
from wise_edit.methods import METHODS

LEGACY = Path(__file__).parents[1] / "fixtures" / "legacy-v1"


def test_a_save_from_the_old_layout_loads_and_computes_the_same():
    model = AutoModelForCausalLM.from_pretrained(LEGACY / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(LEGACY / "model")
    expected = json.loads((LEGACY / "expected.json").read_text())
    assert saved_method(LEGACY / "save") == "WISE"
    editor = load_editor(model, tokenizer, LEGACY / "save")
    assert isinstance(editor, WiseEditor) and editor.num_edits == expected["num_edits"]
    assert editor.config.mode == "retrieve" and len(editor.memories) == 2
    # made before these settings existed: it keeps editing as it was made
    assert editor.config.rehearse_rows == 0 and editor.config.prompt_format == "raw"
    assert editor.routed(expected["prompts"]) == expected["route"]
    batch = tokenizer(expected["prompts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = editor(**batch).logits[:, -1]
    # equal up to float summation order (the fixture was computed with one CPU thread)
    expected_logits = load_file(str(LEGACY / "expected.safetensors"))["logits"]
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    editor.edit(*EDITS[3])  # and it continues
    assert editor.num_edits == expected["num_edits"] + 1


def test_saves_use_fixed_names_and_name_their_method(tokenizer, tmp_path):
    editor = GraceEditor(tiny_model(), tokenizer, GraceConfig(layer=2, max_steps=3))
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "g")
    names = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert names == sorted([CONFIG_FILE, STATE_FILE, TENSOR_FILE])
    config = json.loads((tmp_path / "g" / CONFIG_FILE).read_text())
    state = json.loads((tmp_path / "g" / STATE_FILE).read_text())
    assert config["method"] == "GRACE" and config["epsilon_init"] == 1.0
    assert state["format_version"] == 2 and state["edit_log"][0]["action"] == "add"
    loaded = load_editor(tiny_model(), tokenizer, tmp_path / "g")
    assert isinstance(loaded, GraceEditor) and loaded.routed([EDITS[0][0]]) == [0]


def test_a_save_that_names_no_method_is_refused(tokenizer, tmp_path):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=2))
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "w")
    config_file = tmp_path / "w" / CONFIG_FILE
    config = json.loads(config_file.read_text())
    config["method"] = "ROME"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown method 'ROME'"):
        load_editor(tiny_model(), tokenizer, tmp_path / "w")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_an_editor_and_answers_the_routing_query(name, tokenizer):
    cls = METHODS[name]
    config = fast_config(max_steps=3) if name == "wise" else cls.config_class(layer=2, max_steps=3)
    editor = cls(tiny_model(), tokenizer, config)
    assert isinstance(editor, Editor)
    before = editor.routed([EDITS[0][0], "The weather is"])
    assert before == ([0, 0] if not editor.routes else [-1, -1])
    editor.edit(*EDITS[0])
    after = editor.routed([EDITS[0][0]])
    assert len(after) == 1 and isinstance(after[0], int)
