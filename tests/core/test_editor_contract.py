"""What every editor promises, checked for each method (WISE in merge and retrieve mode,
FT-L, FT-EWC, GRACE, DEFER) on tiny models: an edit moves the edited prompt and is routed
where the method routes, state survives save/load bit for bit and keeps editing as if
never stopped, bad input and a failed edit change nothing, `edit_many` takes mappings and
pairs, retraction where the method has it, and detach gives the model back untouched."""

import pytest
import torch
from conftest import EDITS, FAMILIES, poison_lm_loss, tiny_model
from editors import (
    SETUPS,
    UNRELATED,
    _tok,
    first_token_nll,
    logits_of,
    make,
    same_state,
    state,
)

from wise_edit import Editor, WiseEditor, load_editor
from wise_edit.baselines import GraceEditor
from wise_edit.core.persistence import CONFIG_FILE, STATE_FILE, TENSOR_FILE, saved_method
from wise_edit.metrics import target_nll


@pytest.fixture(params=list(SETUPS))
def method(request):
    """A key of `editors.SETUPS`: how one method is built."""
    return request.param


def same_edits(a, b):
    """`same_state` for an editor that has not edited yet: the same log and tensors (a
    cache built on first use, like WISE's row prefixes, may have been filled)."""
    assert a[0] == b[0]
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# WISE on every family; the baselines on one of each family kind (rotary, GPT-2's Conv1D,
# a biased value projection)
EDIT_CASES = [(m, f) for m in SETUPS if m.startswith("wise") for f in FAMILIES]
EDIT_CASES += [
    (m, f) for m in SETUPS if not m.startswith("wise") for f in ("llama", "gpt2", "gptj")
]


def test_every_method_is_an_editor_and_answers_the_routing_query(method):
    editor = make(method, max_steps=3)
    assert isinstance(editor, Editor)
    before = editor.routed([EDITS[0][0], "The weather is"])
    assert before == ([0, 0] if not editor.routes else [-1, -1])
    editor.edit(*EDITS[0])
    after = editor.routed([EDITS[0][0]])
    assert len(after) == 1 and isinstance(after[0], int)


@pytest.mark.parametrize(("method", "family"), EDIT_CASES)
def test_an_edit_changes_the_edited_prediction(method, family):
    editor = make(method, family)
    model = editor.model
    prompt, target = EDITS[0]
    batch = editor.tokenizer([prompt + " " + target], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    first_before = first_token_nll(editor, prompt, target)
    nll_before = target_nll(model, editor.format, prompt, target)
    result = editor.edit(prompt, target)
    with torch.no_grad():
        after = model(**batch).logits
    assert result.steps >= 1 and editor.num_edits == 1
    assert first_token_nll(editor, prompt, target) < first_before - 1.0
    if editor.routes:
        assert editor.routed([prompt]) == [0]
    if isinstance(editor, WiseEditor):
        # WISE learns the whole answer, and routes the prompt followed by it too (GRACE
        # and DEFER decide on the prompt's own last token or sequence)
        assert target_nll(model, editor.format, prompt, target) < nll_before - 1.0
        assert not torch.allclose(before, after)


def test_save_load_round_trip_and_continue(method, tmp_path):
    editor = make(method)
    cls = type(editor)
    for prompt, target in EDITS[:2]:
        editor.edit(prompt, target)
    editor.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        [CONFIG_FILE, TENSOR_FILE, STATE_FILE]
    )
    assert saved_method(tmp_path / "saved") == cls.method
    fresh = tiny_model()
    loaded = load_editor(fresh, editor.tokenizer, tmp_path / "saved")
    assert type(loaded) is cls
    same_state(state(editor), state(loaded))
    for prompt in [EDITS[0][0], EDITS[1][0], UNRELATED]:
        assert torch.equal(
            logits_of(editor.model, editor.tokenizer, prompt),
            logits_of(fresh, editor.tokenizer, prompt),
        )
    # continuing after load is the same as never having stopped
    editor.edit(*EDITS[2])
    loaded.edit(*EDITS[2])
    a, b = state(editor), state(loaded)
    for entry in a[0] + b[0]:
        entry.pop("seconds")
    same_state(a, b)


def test_load_refuses_another_model_or_layer(method, tmp_path):
    editor = make(method, seed=0, max_steps=3)
    cls, tokenizer = type(editor), editor.tokenizer
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "edits")
    other = tiny_model(seed=1)
    with pytest.raises(ValueError, match="different model or layer: sha256"):
        cls.from_pretrained(other, tokenizer, tmp_path / "edits")
    assert type(other.model.layers[2].mlp.down_proj).__name__ == "Linear"  # nothing attached
    with pytest.raises(ValueError, match="model_type"):
        cls.from_pretrained(tiny_model("mistral"), tokenizer, tmp_path / "edits")
    with pytest.raises(FileNotFoundError, match="not a wise-edit save"):
        cls.from_pretrained(tiny_model(), tokenizer, tmp_path / "nothing")


BAD_INPUT = [
    ("", "x", ValueError, "prompt is empty"),
    ("   ", "x", ValueError, "prompt is empty"),
    ("Who?", "", ValueError, "target is empty"),
    ("Who?", " \n", ValueError, "target is empty"),
    ("Who designed it?", " \t ", ValueError, "target is empty"),
    ("word " * 300, "x", ValueError, "longer than the model's context"),
    (None, "x", TypeError, "strings"),
    ("Who?", 3, TypeError, None),
    ("Who designed it?", "\x00", ValueError, "has no visible characters"),
    ("Who designed it?", "\u200b\u200b", ValueError, "has no visible characters"),
    ("Who designed it?", "\ud800abc", ValueError, "not valid Unicode"),
]


@pytest.mark.parametrize(("prompt", "target", "error", "match"), BAD_INPUT)
def test_bad_input_changes_nothing(method, prompt, target, error, match):
    editor = make(method, max_steps=3)
    untouched = state(editor)
    with pytest.raises(error, match=match):
        editor.edit(prompt, target)
    assert editor.num_edits == 0
    same_edits(untouched, state(editor))  # no memory, codebook entry or delta either
    editor.edit(*EDITS[0])
    before = state(editor)
    with pytest.raises(error, match=match):
        editor.edit(prompt, target)
    same_state(before, state(editor))


def test_a_failed_edit_changes_nothing(method, monkeypatch):
    editor = make(method)
    editor.edit(*EDITS[0])
    before = state(editor)
    calls = poison_lm_loss(monkeypatch, at_call=2)
    with pytest.raises(FloatingPointError, match="not applied"):
        editor.edit(*EDITS[1])
    same_state(before, state(editor))
    # a failed first edit leaves nothing either (for WISE: no memory is created)
    fresh = make(method, "gpt2")
    untouched = state(fresh)
    calls["n"] = 0
    with pytest.raises(FloatingPointError):
        fresh.edit(*EDITS[0])
    assert fresh.num_edits == 0
    same_edits(untouched, state(fresh))


def test_edit_many_accepts_mappings_and_pairs(method):
    editor = make(method, max_steps=3)
    results = editor.edit_many([{"prompt": EDITS[0][0], "target": EDITS[0][1]}, EDITS[1]])
    assert [r.index for r in results] == [0, 1] and editor.num_edits == 2
    with pytest.raises(ValueError, match="'prompt' and 'target'"):
        editor.edit_many([{"src": "x"}])


@pytest.mark.parametrize("bad", [-1, 9, "0", True])
def test_bad_edit_ids_change_nothing(method, bad):
    editor = make(method, max_steps=3)
    editor.edit_many(EDITS[:4])
    log = [dict(e) for e in editor.edit_log]
    expected = (ValueError, TypeError) if editor.retractable else NotImplementedError
    with pytest.raises(expected):
        editor.retract(bad)
    assert editor.edit_log == log


def test_retraction_or_why_not(method):
    editor = make(method, max_steps=3)
    editor.edit_many(EDITS[:2])
    if not editor.retractable:
        with pytest.raises(NotImplementedError, match="cannot retract"):
            editor.retract(0)
        return
    editor.retract(0)
    assert editor.edit_log[0]["retracted"] and editor.live_edits() == [1]
    with pytest.raises(ValueError, match="already retracted"):
        editor.retract(0)


def _answers(editor, prompts):
    """The editor's logits over ``prompts``, and a short greedy generation of each."""
    tok = editor.tokenizer
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = editor(**batch).logits
    out = editor.generate(**batch, max_new_tokens=4, do_sample=False)
    return logits, out


def test_retracting_every_edit_leaves_the_unedited_model(method):
    """The last edit of a memory and of the editor: taking it back leaves a memory with
    nothing in it, which must answer nothing - not break every later forward."""
    editor = make(method, max_steps=3)
    if not editor.retractable:
        pytest.skip(f"{method} cannot retract")
    prompts = [EDITS[0][0], EDITS[1][0], UNRELATED]
    with editor.disabled():
        unedited = _answers(editor, prompts)
    editor.edit(*EDITS[0])
    editor.retract(0)
    after = _answers(editor, prompts)
    assert torch.equal(after[0], unedited[0]) and torch.equal(after[1], unedited[1])
    assert editor.routed(prompts) == [-1, -1, -1]
    editor.edit(*EDITS[1])  # and it keeps editing
    editor.edit(*EDITS[2])
    editor.retract(2)
    editor.retract(1)
    after = _answers(editor, prompts)
    assert torch.equal(after[0], unedited[0]) and torch.equal(after[1], unedited[1])


def test_retracting_the_last_edit_equals_an_editor_that_never_saw_it(method):
    editor = make(method, max_steps=3)
    if not editor.retractable:
        pytest.skip(f"{method} cannot retract")
    never = make(method, max_steps=3)
    editor.edit_many(EDITS[:2])
    never.edit(*EDITS[0])
    editor.retract(1)
    prompts = [EDITS[0][0], EDITS[1][0], UNRELATED]
    mine, theirs = _answers(editor, prompts), _answers(never, prompts)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert editor.routed(prompts) == never.routed(prompts)


def test_routing_an_empty_list_or_a_string(method):
    editor = make(method, max_steps=3)
    editor.edit(*EDITS[0])
    assert editor.routed([]) == []
    with pytest.raises(TypeError, match="list of strings"):
        editor.routed("Who?")


def test_detach_restores_the_model_and_load_refuses_other_methods(method, tmp_path):
    cls, config = SETUPS[method]
    model, tokenizer = tiny_model(), _tok()
    original = model.model.layers[2].mlp.down_proj
    weight = original.weight.clone()
    before = {p: logits_of(model, tokenizer, p) for p in (EDITS[0][0], UNRELATED)}
    editor = cls(model, tokenizer, config())
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "saved")
    editor.detach()
    assert model.model.layers[2].mlp.down_proj is original
    assert torch.equal(original.weight, weight)
    assert not model.model.base_model._forward_pre_hooks
    for prompt, logits in before.items():
        assert torch.equal(logits, logits_of(model, tokenizer, prompt))
    with pytest.raises(RuntimeError, match="detached"):
        editor.edit(*EDITS[1])
    other = GraceEditor if cls is WiseEditor else WiseEditor
    with pytest.raises(ValueError, match=f"holds {cls.method} edits, not {other.method}"):
        other.from_pretrained(model, tokenizer, tmp_path / "saved")
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"
    cls(model, tokenizer, config())  # the model can be edited again
