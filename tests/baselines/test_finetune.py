"""FT-L and FT-EWC on tiny models (and, until the editor contract suite, what every
baseline promises): each edit moves the edited prompt, state survives save/load, bad input
changes nothing; FT-L's bound, EWC's Fisher and penalty."""

import pytest
import torch
from conftest import EDITS, poison_lm_loss, tiny_model
from editors import SETUPS, UNRELATED, _tok, first_token_nll, logits_of, make, same_state, state

from wise_edit import WiseEditor
from wise_edit.baselines import (
    FTLConfig,
    FTLEditor,
)
from wise_edit.core.fastpath import full_lm_loss
from wise_edit.core.persistence import saved_method
from wise_edit.methods import load_editor


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_an_edit_changes_the_edited_prediction(name, family):
    editor = make(name, family)
    prompt, target = EDITS[0]
    before = first_token_nll(editor, prompt, target)
    result = editor.edit(prompt, target)
    assert result.steps >= 1 and editor.num_edits == 1
    assert first_token_nll(editor, prompt, target) < before - 1.0


@pytest.mark.parametrize("name", list(SETUPS))
def test_save_load_round_trip_and_continue(name, tmp_path):
    editor = make(name)
    for prompt, target in EDITS[:2]:
        editor.edit(prompt, target)
    editor.save_pretrained(tmp_path / "saved")
    assert saved_method(tmp_path / "saved") == SETUPS[name][0].method
    fresh = tiny_model()
    loaded = load_editor(fresh, editor.tokenizer, tmp_path / "saved")
    assert type(loaded) is type(editor)
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


@pytest.mark.parametrize("name", list(SETUPS))
def test_bad_input_changes_nothing(name, monkeypatch):
    editor = make(name)
    editor.edit(*EDITS[0])
    before = state(editor)
    with pytest.raises(ValueError, match="prompt is empty"):
        editor.edit("  ", "x")
    with pytest.raises(ValueError, match="target is empty"):
        editor.edit("Who?", "")
    with pytest.raises(TypeError):
        editor.edit("Who?", 3)
    poison_lm_loss(monkeypatch, at_call=2)
    with pytest.raises(FloatingPointError, match="not applied"):
        editor.edit(*EDITS[1])
    same_state(before, state(editor))


@pytest.mark.parametrize("name", list(SETUPS))
def test_detach_restores_the_model_and_load_refuses_other_methods(name, tmp_path):
    model = tiny_model()
    tokenizer = _tok()
    original = logits_of(model, tokenizer, UNRELATED)
    cls, config = SETUPS[name]
    editor = cls(model, tokenizer, config())
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "saved")
    editor.detach()
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"
    assert torch.equal(original, logits_of(model, tokenizer, UNRELATED))
    with pytest.raises(RuntimeError, match="detached"):
        editor.edit(*EDITS[1])
    with pytest.raises(ValueError, match=f"holds {cls.method} edits, not WISE"):
        WiseEditor.from_pretrained(model, tokenizer, tmp_path / "saved")
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"


# ---------------------------------------------------------------------------- FT-L / FT-EWC
def test_ft_l_stays_within_its_bound():
    editor = make("ft-l", norm_bound=1e-3, lr=1e-2)
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    assert editor.layer.delta.abs().max() <= 1e-3 + 1e-7
    assert editor.layer.delta.abs().max() >= 1e-3 - 1e-7  # the bound was reached


def test_ft_edits_reach_unrelated_inputs_but_grace_does_not():
    """The triangle in miniature: fine-tuning has no scope, the codebook has."""
    for name, changed in [("ft-l", True), ("grace", False)]:
        editor = make(name)
        before = logits_of(editor.model, editor.tokenizer, UNRELATED)
        editor.edit(*EDITS[0])
        after = logits_of(editor.model, editor.tokenizer, UNRELATED)
        assert (not torch.equal(before, after)) is changed


def test_ewc_fisher_is_the_mean_squared_gradient_of_recent_edits():
    editor = make("ft-ewc", replay=2)
    assert editor.fisher(editor.layer.delta) is None
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    delta = editor.layer.delta.clone()
    expected = torch.zeros_like(delta)
    for prompt, target in EDITS[1:3]:  # the two most recent, by the plain full forward
        rows = editor._edit_rows(prompt, target)
        probe = torch.zeros_like(delta, requires_grad=True)
        with editor.layer.trial(delta + probe):
            loss = full_lm_loss(editor.model, rows.input_ids, rows.attention_mask, rows.targets)
        expected += torch.autograd.grad(loss, probe)[0].pow(2)
    torch.testing.assert_close(editor.fisher(delta), expected / 2, rtol=1e-4, atol=1e-10)
    assert sorted(editor._past) == [1, 2]  # older captures are dropped


def test_ewc_penalty_holds_weights_important_to_past_edits():
    free = make("ft-ewc", ewc_lambda=0.0)
    held = make("ft-ewc", ewc_lambda=1e6)
    for editor in (free, held):
        editor.edit(*EDITS[0])
    first = {id(e): e.layer.delta.clone() for e in (free, held)}
    for editor in (free, held):
        editor.edit(*EDITS[1])
    fisher = held.fisher(first[id(held)])
    important = fisher > fisher.quantile(0.99)
    moved = {id(e): (e.layer.delta - first[id(e)])[important].abs().mean() for e in (free, held)}
    assert moved[id(held)] < moved[id(free)]


def test_baseline_edits_stop_too(tokenizer):
    """The stop is part of the shared edit template: a baseline's edit answers, then EOS."""
    from wise_edit import metrics

    model = tiny_model("llama")
    editor = FTLEditor(model, tokenizer, FTLConfig(layer=2, lr=0.05, max_steps=60))
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    ids = metrics.greedy_continuation(model, editor.format, prompt, 20)
    assert ids == editor.format.target_ids(target) + [tokenizer.eos_token_id]


def test_methods_that_cannot_retract_say_why(tokenizer):
    editor = FTLEditor(tiny_model(), tokenizer, FTLConfig(layer=2, max_steps=3))
    editor.edit(*EDITS[0])
    with pytest.raises(NotImplementedError, match="cannot retract"):
        editor.retract(0)
