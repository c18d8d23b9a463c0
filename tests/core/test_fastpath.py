"""The fast editing forward (lower layers replayed, logits at target positions only) must
give the same loss and gradient as running the whole model."""

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor
from wise_edit.core.fastpath import (
    backbone_inputs,
    capture,
    capture_after_head,
    capture_head,
    fast_target_logits,
    full_lm_loss,
    greedy_hits,
    layer_output,
    shared_head,
    target_loss,
)
from wise_edit.core.prompts import PromptFormat
from wise_edit.core.rows import build_rows, left_pad


def _loss_and_grad(editor, rows, fast: bool):
    weight = editor.layer.weight
    step = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    step.requires_grad_(True)
    with editor.layer.trial(step):
        if fast:
            lower = capture(
                editor.model.base_model,
                editor.layers,
                editor.layer_index,
                editor.layer,
                rows.input_ids,
                rows.attention_mask,
            )
            logits = fast_target_logits(
                editor.model,
                editor.layers,
                editor.layer_index,
                lower,
                rows.input_ids,
                rows.attention_mask,
                rows.targets.shape[1],
            )
            loss = target_loss(logits, rows.targets)
        else:
            loss = full_lm_loss(editor.model, rows.input_ids, rows.attention_mask, rows.targets)
    (grad,) = torch.autograd.grad(loss, step)
    return loss.detach(), grad


def test_fast_path_matches_full_forward(family, tokenizer):
    model = tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    editor = WiseEditor(model, tokenizer, fast_config())
    prefixes = ["Because of the rain", "I think that"]
    rows = build_rows(PromptFormat.create(tokenizer), EDITS[0][0], EDITS[0][1], prefixes)
    fast_loss, fast_grad = _loss_and_grad(editor, rows, fast=True)
    full_loss, full_grad = _loss_and_grad(editor, rows, fast=False)
    torch.testing.assert_close(fast_loss, full_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_grad, full_grad, atol=1e-5, rtol=1e-4)
    assert fast_grad.abs().sum() > 0


def test_fast_path_at_layer_zero(tokenizer):
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config(layer=0))
    rows = build_rows(PromptFormat.create(tokenizer), *EDITS[1], ["The day"])
    fast_loss, fast_grad = _loss_and_grad(editor, rows, fast=True)
    full_loss, full_grad = _loss_and_grad(editor, rows, fast=False)
    torch.testing.assert_close(fast_loss, full_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_grad, full_grad, atol=1e-5, rtol=1e-4)


def test_replay_restores_layer_forward(tokenizer):
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config())
    rows = build_rows(PromptFormat.create(tokenizer), *EDITS[0], [])
    _loss_and_grad(editor, rows, fast=True)
    assert all("forward" not in vars(layer) for layer in editor.layers)


def test_layer_output_is_the_full_forwards_state_and_runs_nothing_above(family, tokenizer):
    model = tiny_model(family)
    editor = WiseEditor(model, tokenizer, fast_config())
    rows = build_rows(PromptFormat.create(tokenizer), *EDITS[0], ["The day"])
    ran: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out, i=i: ran.append(i) or None)
        for i, layer in enumerate(editor.layers)
    ]
    with torch.no_grad():
        inputs = backbone_inputs(rows.input_ids, rows.attention_mask)
        full = model(**inputs, output_hidden_states=True)
        ran.clear()
        states = layer_output(
            model.base_model, editor.layers, 1, rows.input_ids, rows.attention_mask
        )
    for hook in hooks:
        hook.remove()
    assert ran == [0]
    assert torch.equal(states, full.hidden_states[1])


def test_layer_output_refuses_a_depth_the_model_lacks(tokenizer):
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config())
    ids = torch.tensor([[1, 2, 3]])
    for depth in (0, len(editor.layers) + 1):
        with pytest.raises(ValueError, match="decoder layers"):
            layer_output(model.base_model, editor.layers, depth, ids, torch.ones_like(ids))


def test_editor_paths_give_the_same_edit(tokenizer):
    """The config switch between the paths changes speed, not the result."""
    deltas = []
    for fast in (True, False):
        editor = WiseEditor(tiny_model("gpt2"), tokenizer, fast_config(fast_path=fast))
        editor.edit(*EDITS[0])
        deltas.append(editor.memories[0].delta)
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-5, rtol=1e-4)


def test_greedy_hits_reads_every_scored_target_token():
    logits = torch.zeros((2, 3, 5))
    targets = torch.tensor([[1, 2, 3], [-100, 4, 0]])
    for row, tokens in enumerate(targets.tolist()):
        for pos, tok in enumerate(tokens):
            logits[row, pos, max(tok, 0)] = 1.0
    assert bool(greedy_hits(logits, targets))
    logits[1, 0] = 0.0  # an ignored position may say anything
    logits[1, 0, 3] = 5.0
    assert bool(greedy_hits(logits, targets))
    logits[0, 2, 4] = 2.0  # one scored token wrong
    assert not bool(greedy_hits(logits, targets))


def test_an_edit_runs_the_lower_layers_for_its_rows_and_random_negatives_only(
    tokenizer, monkeypatch
):
    """The hard negatives' activations are computed once, when the editor is made."""
    import wise_edit.core.editor as core_editor

    editor = WiseEditor(tiny_model("llama"), tokenizer, fast_config(rehearse_rows=0))
    batches = []

    def counted(*args, **kwargs):
        batches.append(args[4].shape[0])  # input_ids (B, T)
        return capture(*args, **kwargs)

    monkeypatch.setattr(core_editor, "capture", counted)
    editor.edit(*EDITS[0])  # the first edit too: calibration is not part of it
    rows = 1 + editor.config.prefixes.count  # the bare prompt and one row per prefix
    assert batches == [rows, editor.config.negatives.random]  # no batch of hard negatives


def test_a_subset_of_rows_computes_what_it_computes_in_the_whole_batch(family, tokenizer):
    """`EditRows.take` and `Captured.take`: rows picked out of an edit's batch, their
    all-padding columns dropped, give the same logits as inside the whole batch."""
    model = tiny_model(family)
    editor = WiseEditor(model, tokenizer, fast_config())
    prefixes = ["Because of the long and heavy rain that fell", "I think", "The day"]
    rows = build_rows(PromptFormat.create(tokenizer), EDITS[0][0], EDITS[0][1], prefixes)
    n = rows.targets.shape[1]
    args = (editor.model.base_model, editor.layers, editor.layer_index, editor.layer)
    lower = capture(*args, rows.input_ids, rows.attention_mask)
    whole = fast_target_logits(
        editor.model,
        editor.layers,
        editor.layer_index,
        lower,
        rows.input_ids,
        rows.attention_mask,
        n,
    )
    index = [0, 2, 3]  # without the longest row: a shared leading pad column goes
    taken, start = rows.take(index)
    assert start > 0 and taken.input_ids.shape[1] == rows.input_ids.shape[1] - start
    assert bool(taken.attention_mask[:, 0].any())
    part = fast_target_logits(
        editor.model,
        editor.layers,
        editor.layer_index,
        lower.take(index, start),
        taken.input_ids,
        taken.attention_mask,
        n,
    )
    torch.testing.assert_close(part, whole[index], atol=1e-5, rtol=1e-4)
    assert torch.equal(taken.targets, rows.targets[index])
    assert torch.equal(taken.prompt_mask, rows.prompt_mask[index, start:])


def test_rows_after_a_cached_head_capture_what_the_whole_rows_do(family, tokenizer):
    """`capture_after_head`: rows sharing a token prefix run only their own tokens against
    the prefix's cached keys and values, and give `capture`'s result on every real token."""
    model = tiny_model(family)
    editor = WiseEditor(model, tokenizer, fast_config())
    head = [5, 9, 11, 3, 7, 8, 21]
    seqs = [head + [30, 31, 32], head + [40], head + [50, 51, 52, 53, 54], head + [60, 61]]
    ids, mask = left_pad(seqs, 0)
    args = (editor.model.base_model, editor.layers, editor.layer_index, editor.layer)
    assert shared_head(ids, mask) == tuple(head)
    plain = capture(*args, ids, mask)
    got = capture_after_head(*args, ids, mask, capture_head(*args, tuple(head)))
    real = mask.bool()
    lower = plain.lower_output
    lower = lower[0] if isinstance(lower, tuple) else lower
    torch.testing.assert_close(got.acts[real], plain.acts[real], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(got.lower_output[real], lower[real], atol=5e-5, rtol=1e-4)
    assert not got.acts[~real].any()  # padding: zeros


def test_joined_captures_pad_each_part_on_the_left_and_give_it_back():
    from wise_edit.core.fastpath import Captured

    a = Captured(torch.ones(2, 2, 3), (torch.ones(2, 2, 4), "kept"))
    b = Captured(torch.full((1, 3, 3), 2.0), (torch.full((1, 3, 4), 2.0), "other"))
    joined = Captured.join([a, b])
    assert joined.acts.shape == (3, 3, 3) and joined.lower_output[1] == "kept"
    assert joined.acts[:2, 0].eq(0).all() and joined.acts[:2, 1:].eq(1).all()
    assert joined.lower_output[0].shape == (3, 3, 4)
    back = joined.take([0, 1], 1)
    assert torch.equal(back.acts, a.acts) and torch.equal(back.lower_output[0], a.lower_output[0])
    assert Captured.join([Captured(a.acts, None)]).lower_output is None
