"""FT-L and FT-EWC on tiny models: FT-L's bound, no scope (unlike GRACE), EWC's Fisher and
penalty, and the stop learned with the answer. What every editor promises is in
tests/core/test_editor_contract.py."""

import torch
from conftest import EDITS, tiny_model
from editors import UNRELATED, logits_of, make

from wise_edit.baselines import FTLConfig, FTLEditor
from wise_edit.core.fastpath import full_lm_loss


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
