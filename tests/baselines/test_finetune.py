"""The paper's baselines on tiny models: each edit moves the edited prompt, state survives
save/load, bad input changes nothing, and GRACE's codebook rules on hand-made vectors."""

import copy

import pytest
import torch
from conftest import EDITS, poison_lm_loss, tiny_model

from wise_edit import WiseEditor
from wise_edit.baselines import (
    Codebook,
    DeferConfig,
    DeferEditor,
    FTEWCConfig,
    FTEWCEditor,
    FTLConfig,
    FTLEditor,
    GraceConfig,
    GraceEditor,
)
from wise_edit.baselines.defer import gate_probability
from wise_edit.core.fastpath import full_lm_loss
from wise_edit.core.persistence import saved_method
from wise_edit.core.rows import target_ids
from wise_edit.methods import METHODS, editor_class, load_editor
from wise_edit.metrics import target_logits

# settings that move a tiny random model in a few steps (the real defaults are the paper's)
SETUPS = {
    "ft-l": (FTLEditor, lambda: FTLConfig(layer=2, lr=1e-2, max_steps=20)),
    "ft-ewc": (FTEWCEditor, lambda: FTEWCConfig(layer=2, max_steps=20, replay=2)),
    "grace": (GraceEditor, lambda: GraceConfig(layer=2, max_steps=20)),
    "defer": (DeferEditor, lambda: DeferConfig(layer=2, lr=1e-2, max_steps=20)),
}
UNRELATED = "The weather today is mild and calm."


def make(name, family="llama", seed=0, **overrides):
    cls, config = SETUPS[name]
    cfg = config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cls(tiny_model(family, seed=seed), _tok(), cfg)


def _tok():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()


def first_token_nll(editor, prompt, target):
    tok = editor.tokenizer
    ids = target_ids(tok, target)
    logits = target_logits(editor.model, tok(prompt)["input_ids"], ids)
    return -torch.log_softmax(logits[0].float(), -1)[ids[0]].item()


def state(editor):
    tensors = {k: v.clone() for k, v in editor._tensors().items()}
    return copy.deepcopy(editor.edit_log), copy.deepcopy(editor._state()), tensors


def same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def layer_io(editor, batch):
    """The wrapped layer's input and output in one forward of ``batch``."""
    seen = {}
    handle = editor.layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        editor.model(**batch)
    handle.remove()
    return seen["x"], seen["out"]


def logits_of(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer([prompt], return_tensors="pt")).logits


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


def test_method_registry():
    assert set(METHODS) == {"wise", "ft-l", "ft-ewc", "grace", "defer"}
    assert editor_class("GRACE") is GraceEditor
    with pytest.raises(ValueError, match="unknown method"):
        editor_class("rome")
    with pytest.raises(ValueError, match="FTLConfig.lr"):
        FTLConfig(lr=0)
    with pytest.raises(ValueError, match="GraceConfig.epsilon_init"):
        GraceConfig(epsilon_init=-1)
    with pytest.raises(ValueError, match="DeferConfig.threshold"):
        DeferConfig(threshold=1.0)


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


# ---------------------------------------------------------------------------- GRACE
def _book():
    return Codebook(key_dim=2, value_dim=3, device=torch.device("cpu"))


def test_codebook_first_key_and_far_key_are_added():
    book = _book()
    first = book.place(torch.tensor([0.0, 0.0]), "Paris", epsilon_init=1.0)
    assert (first.action, first.index, first.radius) == ("add", 0, 1.0)
    assert len(book) == 0  # placing decides; nothing changes before apply
    book.apply(first, torch.tensor([0.0, 0.0]), "Paris", torch.ones(3))
    far = book.place(torch.tensor([3.0, 0.0]), "Rome", epsilon_init=1.0)  # 3 > 1 + 1
    assert (far.action, far.index, far.radius) == ("add", 1, 1.0)
    book.apply(far, torch.tensor([3.0, 0.0]), "Rome", 2 * torch.ones(3))
    assert book.radii.tolist() == [1.0, 1.0] and book.labels == ["Paris", "Rome"]


def test_codebook_same_label_expands_the_radius_and_retrains_the_value():
    book = _book()
    book.apply(book.place(torch.zeros(2), "Paris", 1.0), torch.zeros(2), "Paris", torch.ones(3))
    near = book.place(torch.tensor([1.5, 0.0]), "Paris", epsilon_init=1.0)  # 1.5 <= 1 + 1
    assert (near.action, near.index, near.radius) == ("expand", 0, 1.5)
    book.apply(near, torch.tensor([1.5, 0.0]), "Paris", 5 * torch.ones(3))
    assert len(book) == 1 and book.radii.tolist() == [1.5]
    assert book.values[0].tolist() == [5.0, 5.0, 5.0]
    inside = book.place(torch.tensor([0.5, 0.0]), "Paris", epsilon_init=1.0)
    assert (inside.action, inside.radius) == ("expand", 1.5)  # never shrinks


def test_codebook_conflicting_label_splits_both_radii():
    book = _book()
    book.apply(book.place(torch.zeros(2), "Paris", 1.0), torch.zeros(2), "Paris", torch.ones(3))
    clash = book.place(torch.tensor([0.0, 1.2]), "Rome", epsilon_init=1.0)
    assert (clash.action, clash.index, clash.nearest) == ("split", 1, 0)
    book.apply(clash, torch.tensor([0.0, 1.2]), "Rome", 2 * torch.ones(3))
    torch.testing.assert_close(book.radii, torch.tensor([0.6, 0.6]))
    index, hit = book.lookup(torch.tensor([[0.0, 0.5], [0.0, 0.7], [5.0, 5.0]]))
    assert index.tolist()[:2] == [0, 1] and hit.tolist() == [True, True, False]


def test_grace_replaces_only_the_last_token_of_a_hit():
    editor = make("grace")
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    assert editor.routed([prompt, UNRELATED]) == [0, -1]
    layer = editor.layer
    x, out = layer_io(editor, editor.tokenizer([prompt], return_tensors="pt"))
    base = layer.base_layer(x)
    assert torch.equal(out[0, :-1], base[0, :-1])
    assert torch.equal(out[0, -1], layer.codebook.values[0])


def test_grace_generation_uses_the_codebook():
    editor = make("grace", max_steps=60)
    prompt, target = EDITS[1]
    editor.edit(prompt, target)
    batch = editor.tokenizer([prompt], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=1, do_sample=False)
    first = editor.tokenizer(" " + target, add_special_tokens=False)["input_ids"][0]
    assert out[0, -1].item() == first


# ---------------------------------------------------------------------------- DEFER
def test_gate_probability_is_a_logistic_probe():
    query = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    p = gate_probability(query, torch.tensor([0.5, -1.0]), torch.tensor(0.25))
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([0.5 - 2.0 + 0.25, 1.0 + 0.25])))


def test_defer_routes_whole_sequences_and_holds_during_generation():
    editor = make("defer")
    editor.edit(*EDITS[0])
    layer = editor.layer
    tok = editor.tokenizer
    # a hand-set classifier: accept a sequence iff the last token's first input is > 0
    with torch.no_grad():
        layer.gate_weight.zero_()
        layer.gate_weight[0] = 100.0
        layer.gate_bias.zero_()
    prompts = [EDITS[0][0], EDITS[2][0], UNRELATED, EDITS[3][0]]
    accepted = [index == 0 for index in editor.routed(prompts)]
    assert True in accepted and False in accepted  # both branches are exercised
    batch = tok(prompts, return_tensors="pt", padding=True)
    x, out = layer_io(editor, batch)
    base = layer.base_layer(x)
    head = layer._head(x, layer.params())
    for row, accept in enumerate(accepted):
        expected = head[row] if accept else base[row]
        assert torch.equal(out[row], expected.to(out.dtype))
    decisions = []
    original = layer.route
    layer.route = lambda *args: decisions.append(1) or original(*args)
    editor.generate(**batch, max_new_tokens=3, do_sample=False)
    del layer.route
    assert len(decisions) == 1  # decided at prefill, held for every new token


def test_baseline_edits_stop_too(tokenizer):
    """The stop is part of the shared edit template: a baseline's edit answers, then EOS."""
    from wise_edit import metrics

    model = tiny_model("llama")
    editor = FTLEditor(model, tokenizer, FTLConfig(layer=2, lr=0.05, max_steps=60))
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    ids = metrics.greedy_continuation(model, editor.format, prompt, 20)
    assert ids == editor.format.target_ids(target) + [tokenizer.eos_token_id]
