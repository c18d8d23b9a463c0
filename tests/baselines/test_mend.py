"""MEND on tiny models, exactly: the gradient's factorisation into per-token (u, delta)
equals autograd's weight gradient; the editor network with zero residual weights is the
identity, so an edit is exactly the raw gradient step -lr * dL/dW; the normalisation
statistics are the data's; trained networks are found, checked and refused by the model
they were trained for; training moves the network and caches it. What every editor
promises is in tests/core/test_editor_contract.py."""

import pytest
import torch
from conftest import EDITS, tiny_model, tiny_tokenizer

from wise_edit.baselines import MendConfig, MendEditor, MendTraining
from wise_edit.baselines.mend import EditorNetwork, factored_gradient, store, token_factors
from wise_edit.baselines.mend.editor import network_fields
from wise_edit.baselines.mend.training import locality_kl, train_and_cache
from wise_edit.core.fastpath import full_lm_loss
from wise_edit.data import EditRecord


# ---------------------------------------------------------------------------- factorisation
def test_the_weight_gradient_is_the_sum_of_per_token_outer_products():
    torch.manual_seed(0)
    linear = torch.nn.Linear(7, 5, bias=True).double()
    x = torch.randn(3, 4, 7, dtype=torch.float64)  # (B, T, in)
    out = linear(x)
    loss = (out.tanh() * torch.randn_like(out)).sum()
    (delta,) = torch.autograd.grad(loss, out, retain_graph=True)
    (weight_grad,) = torch.autograd.grad(loss, linear.weight)
    ones = torch.ones(3, 4)
    u, d = token_factors(x, delta, ones)
    assert u.shape == (12, 7) and d.shape == (12, 5)
    expected = factored_gradient(x.reshape(-1, 7), delta.reshape(-1, 5))
    torch.testing.assert_close(expected, weight_grad, rtol=1e-12, atol=1e-14)


def test_token_factors_leave_out_pads_and_tokens_without_gradient():
    acts = torch.randn(2, 4, 3)
    grads = torch.randn(2, 4, 2)
    grads[0, 3] = 0  # a token after the last one the loss reads
    acts[1, 1] = 0
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 left-padded
    u, d = token_factors(acts, grads, mask)
    assert u.shape == (5, 3) and d.shape == (5, 2)
    kept = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]]).bool()
    assert torch.equal(u, acts[kept]) and torch.equal(d, grads[kept])
    # what is left out adds nothing to the gradient of the unpadded tokens
    all_real = factored_gradient(acts[mask.bool()], grads[mask.bool()])
    torch.testing.assert_close(factored_gradient(u, d), all_real)


# ---------------------------------------------------------------------------- the network
def test_zero_residual_weights_are_the_identity_and_the_raw_gradient_step():
    net = EditorNetwork(6, 4, rank=3, lr=0.25)
    u, d = torch.randn(5, 6), torch.randn(5, 4)
    u_new, d_new = net(u, d)
    assert torch.equal(u_new, u) and torch.equal(d_new, d)
    assert torch.equal(net.weight_update(u, d), -0.25 * factored_gradient(u, d))


def test_training_can_start_from_the_identity():
    """At U = 0 every pre-activation is exactly 0: a ReLU would pass no gradient there and
    the network could never leave the identity; the reference's clamp does."""
    net = EditorNetwork(6, 4, rank=3)
    net.weight_update(torch.randn(5, 6), torch.randn(5, 4)).pow(2).sum().backward()
    for layer in net.layers:
        assert layer.u.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0


def test_normalisation_statistics_are_the_data_mean_and_std():
    net = EditorNetwork(3, 2, rank=2)
    chunks = [(torch.randn(n, 3) * 4 + 1, torch.randn(n, 2) * 1e-3) for n in (1, 5, 9)]
    net.observe(*chunks[0])
    z = torch.cat([torch.cat(c, -1) for c in chunks[:1]])
    assert torch.equal(net.normalised(z), z)  # one token: no statistics yet
    for chunk in chunks[1:]:
        net.observe(*chunk)
    z = torch.cat([torch.cat(c, -1) for c in chunks])
    assert net.count.item() == 15
    torch.testing.assert_close(net.mean, z.mean(0))
    expected = (z - z.mean(0)) / (z.std(0) + 1e-7)
    torch.testing.assert_close(net.normalised(z), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the editor
def _weight_grad(editor, prompt, target):
    """dL/dW of the edit's target NLL at the editor's current weights, by autograd
    through the plain full forward (no fast path, no probe)."""
    rows = editor._edit_rows(prompt, target)
    delta = editor.layer.delta.clone()
    probe = torch.zeros_like(delta, requires_grad=True)
    with editor.layer.trial(delta + probe):
        loss = full_lm_loss(editor.model, rows.input_ids, rows.attention_mask, rows.targets)
    return torch.autograd.grad(loss, probe)[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_an_identity_network_edit_is_exactly_the_raw_gradient_step(family):
    """The defining property: MEND's network with zero weights reproduces the gradient
    step W - lr * dL/dW, here on every layout (GPT-2's Conv1D, a biased projection), and
    for a second edit at the weights the first one left. Equal up to float32 rounding
    (the change is kept in float32; the gradient is summed in another order)."""
    model = tiny_model(family)
    config = MendConfig(layer=2, lr=3.0, network="identity")
    editor = MendEditor(model, tiny_tokenizer(), config)
    for prompt, target in EDITS[:2]:
        before = editor.layer.delta.clone()
        grad = _weight_grad(editor, prompt, target)
        editor.edit(prompt, target)
        step = editor.layer.delta - before
        scale = grad.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(step, -3.0 * grad, rtol=1e-5, atol=3e-6 * scale)


def test_the_fast_and_the_full_forward_give_the_same_edit():
    steps = []
    for fast in (True, False):
        config = MendConfig(layer=2, lr=3.0, network="identity", fast_path=fast)
        editor = MendEditor(tiny_model(), tiny_tokenizer(), config)
        editor.edit(*EDITS[0])
        steps.append(editor.layer.delta.clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6 * steps[1].abs().max())


def test_editing_reads_the_gradient_without_changing_the_forward():
    """The probe the gradient is read through adds zeros: the edited layer computes the
    same output with and without it."""
    editor = MendEditor(tiny_model(), tiny_tokenizer(), MendConfig(layer=2, network="identity"))
    x = torch.randn(2, 3, editor.layer.weight.shape[1])
    delta = torch.randn_like(editor.layer.delta) * 0.01
    probe = torch.zeros(2, 3, editor.layer.weight.shape[0], requires_grad=True)
    with editor.layer.trial(delta):
        plain = editor.layer(x)
    with editor.layer.trial((delta, probe)):
        probed = editor.layer(x)
    assert torch.equal(plain, probed)


# ---------------------------------------------------------------------------- trained networks
def _records():
    return [
        EditRecord(p, t, rephrase=f"Tell me: {p}", loc=EDITS[i - 1][0], loc_ans=EDITS[i - 1][1])
        for i, (p, t) in enumerate(EDITS)
    ]


def test_without_a_trained_network_the_editor_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path))
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="wise-edit train-mend"):
        MendEditor(model, tiny_tokenizer(), MendConfig(layer=2))
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"  # nothing attached


def test_training_moves_the_network_and_the_editor_finds_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path))
    model, tokenizer = tiny_model(), tiny_tokenizer()
    config = MendConfig(layer=2, lr=1e-2, rank=4)
    training = MendTraining(steps=6, accumulate=3, lr=1e-3, lr_lr=1e-3, holdout=1)
    weight = model.model.layers[2].mlp.down_proj.weight.clone()
    folder, meta = train_and_cache(model, tokenizer, _records(), config, training)
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"  # detached
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, weight)
    assert meta["steps"] == 6 and len(meta["curve"]) == 2 and meta["records"] == len(EDITS) - 1
    assert {"holdout_before", "holdout_after", "seconds"} <= set(meta)
    editor = MendEditor(model, tokenizer, config)
    assert editor.network_info["source"] == str(folder)
    assert editor.network.count.item() > 0  # statistics gathered in training
    assert editor.network.edit_lr.item() != pytest.approx(1e-2)  # alpha was trained
    assert any(layer.u.abs().sum() > 0 for layer in editor.network.layers)
    editor.edit(*EDITS[0])
    assert editor.layer.delta.abs().max() > 0


def test_a_network_trained_for_another_model_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path))
    tokenizer = tiny_tokenizer()
    config = MendConfig(layer=2, rank=4)
    mine = network_fields(tiny_model(seed=0), config, tokenizer)
    theirs = network_fields(tiny_model(seed=1), config, tokenizer)
    assert mine["model_sha256"] != theirs["model_sha256"]
    assert store.cache_folder(mine) != store.cache_folder(theirs)
    # a network copied under this model's key but recorded for the other is refused
    store.save_network(store.cache_folder(mine), EditorNetwork(64, 32, rank=4), theirs)
    model = tiny_model(seed=0)
    with pytest.raises(ValueError, match="trained for another model_sha256"):
        MendEditor(model, tokenizer, config)
    assert type(model.model.layers[2].mlp.down_proj).__name__ == "Linear"


def test_the_locality_kl_is_zero_for_the_same_logits_and_positive_otherwise():
    logits = torch.randn(2, 3, 11)
    assert locality_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert locality_kl(logits, logits.flip(-1)).item() > 0
