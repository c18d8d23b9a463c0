"""WISE's editing loop: shards and merges, masks and thresholds that survive a save, the
model's own parameters untouched, rehearsal. What every editor promises (the edit moves the
answer, save/load, bad input, detach) is in tests/core/test_editor_contract.py."""

import copy

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor
from wise_edit.wise.merging import ties


def _snapshot(editor):
    return {
        "edits": editor.num_edits,
        "log": copy.deepcopy(editor.edit_log),
        "memories": [
            (
                m.delta.clone(),
                [m.shard_vector(i).clone() for i in range(m.shard_count)],
                m.epsilon,
                list(m.edit_ids),
                m.merges,
                m.closed,
            )
            for m in editor.memories
        ],
    }


def _same(a, b):
    assert a["edits"] == b["edits"] and a["log"] == b["log"]
    assert len(a["memories"]) == len(b["memories"])
    for (d1, v1, e1, i1, m1, c1), (d2, v2, e2, i2, m2, c2) in zip(a["memories"], b["memories"]):
        assert torch.equal(d1, d2) and len(v1) == len(v2)
        assert all(torch.equal(x, y) for x, y in zip(v1, v2))
        assert (e1, i1, m1, c1) == (e2, i2, m2, c2)


def test_edit_reports_when_the_answer_became_right(tokenizer):
    model = tiny_model()
    editor = WiseEditor(model, tokenizer, fast_config(max_steps=40, lr=0.05))
    result = editor.edit(*EDITS[0])
    # the first step the teacher-forced greedy answer was right; the rest went to margins
    assert result.answered_at is not None and 1 < result.answered_at <= result.steps
    assert editor.edit_log[-1]["answered_at"] == result.answered_at


def test_side_steps_spend_the_margin_steps_without_forwards(tokenizer, monkeypatch):
    # the same edit twice: with side steps, once the answer is right the routing margins
    # get updates of their own, and the edit stops (answered, margins under the bound)
    # after fewer forwards; a tiny random model's NLL settles higher than a real one's
    monkeypatch.setattr("wise_edit.core.editor.SIDE_STEPS_LM", 5.0)
    results = {}
    for side_steps in (0, 8):
        editor = WiseEditor(
            tiny_model(),
            tokenizer,
            fast_config(max_steps=60, lr=0.1, early_stop_loss=1.0, side_steps=side_steps),
        )
        results[side_steps] = editor.edit(*EDITS[0])
        assert editor.routed([EDITS[0][0]]) == [0]
        assert editor.edit_log[-1]["side_steps"] == results[side_steps].side_steps
    plain, cheap = results[0], results[8]
    assert plain.side_steps == 0 and cheap.side_steps > 0
    assert cheap.steps < plain.steps < 60  # both stopped by the rule, not the budget
    assert cheap.loss - cheap.lm_loss < 1.0


def test_the_papers_sgd_still_edits(tokenizer):
    from wise_edit.metrics import target_nll

    model = tiny_model()
    config = fast_config(max_steps=30, optimizer="sgd", lr=2.0)
    editor = WiseEditor(model, tokenizer, config)
    prompt, target = EDITS[0]
    nll_before = target_nll(model, editor.format, prompt, target)
    editor.edit(prompt, target)
    assert editor.routed([prompt]) == [0]
    assert target_nll(model, editor.format, prompt, target) < nll_before - 1.0


def test_mask_invariants(tokenizer):
    editor = WiseEditor(
        tiny_model(), tokenizer, fast_config(mask_ratio=0.3, shard_size=2, shards_per_merge=3)
    )
    for prompt, target in EDITS[:4]:
        editor.edit(prompt, target)
    memory = editor.memories[0]
    masks = memory.masks
    assert len(masks) == 3 and all(m.dtype == torch.bool for m in masks)
    share = [m.float().mean().item() for m in masks]
    assert all(0.2 < s < 0.4 for s in share)
    touched = masks[0] | masks[1]
    assert torch.all(memory.delta[~touched] == 0)  # nothing outside the shards' masks moved
    for shard in range(memory.shard_count):
        vector = memory.shard_vector(shard)
        assert torch.all(vector[~masks[shard]] == 0)
    stored = memory.state_dict()["shard_values"]  # compact: only the masked entries
    assert stored.numel() == sum(int(m.sum()) for m in masks[: memory.shard_count])
    assert memory.delta.abs().max() <= editor.config.memory.norm_bound


def test_norm_bound_holds(tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(norm_bound=1e-3, lr=50.0))
    editor.edit(*EDITS[0])
    assert editor.memories[0].delta.abs().max() <= 1e-3 + 1e-9


def test_merge_mode_across_shard_boundaries(tokenizer):
    editor = WiseEditor(
        tiny_model(), tokenizer, fast_config(mask_ratio=0.5, shard_size=1, shards_per_merge=2)
    )
    editor.edit(*EDITS[0])
    memory = editor.memories[0]
    assert memory.shard_count == 1 and memory.merges == 0
    before_merge = memory.delta.clone()
    first = memory.shard_vector(0)
    editor.edit(*EDITS[1])
    # the merge folds both shards into the memory (Eq. 8) and drops the shards
    assert memory.merges == 1 and len(memory.masks) == 0 and memory.shard_count == 0
    assert len(editor.memories) == 1 and not memory.closed
    second_step = editor.edit_log[1]
    assert second_step["shard"] == 1
    editor.edit(*EDITS[2])
    editor.edit(*EDITS[3])  # second group merges on top of the first merged memory
    assert memory.merges == 2 and len(editor.memories) == 1
    assert [r["memory"] for r in editor.edit_log] == [0, 0, 0, 0]
    assert not torch.equal(before_merge, memory.delta) and first.abs().sum() > 0


def test_merge_is_ties_of_the_shard_vectors(tokenizer, monkeypatch):
    editor = WiseEditor(
        tiny_model(),
        tokenizer,
        fast_config(mask_ratio=0.5, shard_size=1, shards_per_merge=2, merge_density=0.6),
    )
    editor.edit(*EDITS[0])
    captured = {}
    import wise_edit.wise.bank as bank

    real_merge = bank.merge_group

    def spy(memory, *args, **kwargs):
        captured["vectors"] = [memory.shard_vector(i) for i in range(memory.shard_count)]
        captured["earlier"] = memory.delta - torch.stack(captured["vectors"]).sum(0)
        real_merge(memory, *args, **kwargs)

    monkeypatch.setattr(bank, "merge_group", spy)
    editor.edit(*EDITS[1])
    expected = captured["earlier"] + ties(captured["vectors"], [0.5, 0.5], density=0.6)
    torch.testing.assert_close(editor.memories[0].delta, expected.clamp(-1, 1))


def test_retrieve_mode_opens_a_memory_per_merge(tokenizer):
    for family in ("llama", "gpt2"):  # gpt2: Conv1D in the retrieve path
        editor = WiseEditor(
            tiny_model(family),
            tokenizer,
            fast_config(mode="retrieve", shard_size=1, shards_per_merge=2),
        )
        for prompt, target in EDITS[:5]:
            editor.edit(prompt, target)
        memories = editor.memories
        assert len(memories) == 3
        assert [m.closed for m in memories] == [True, True, False]
        assert [len(m.edit_ids) for m in memories] == [2, 2, 1]
        assert len({m.epsilon for m in memories}) == 3  # each memory its own threshold
        assert [r["memory"] for r in editor.edit_log] == [0, 0, 1, 1, 2]


def test_threshold_is_ratio_of_min_score_over_current_edits(tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(threshold_ratio=0.5))
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    scores = editor.activation_scores([p for p, _ in EDITS[:3]])[0]
    assert editor.memories[0].epsilon == pytest.approx(0.5 * scores.min().item(), rel=1e-4)


def test_save_load_round_trip_and_continue(tokenizer, tmp_path):
    config = fast_config(mask_ratio=0.5, shard_size=2, shards_per_merge=2)
    straight = WiseEditor(tiny_model(), tokenizer, config)
    for prompt, target in EDITS[:5]:
        straight.edit(prompt, target)

    first = WiseEditor(tiny_model(), tokenizer, config)
    for prompt, target in EDITS[:3]:
        first.edit(prompt, target)
    first.save_pretrained(tmp_path / "edits")

    resumed = WiseEditor.from_pretrained(tiny_model(), tokenizer, tmp_path / "edits")
    saved = _snapshot(first)
    loaded = _snapshot(resumed)
    _same(saved, loaded)
    assert [
        torch.equal(a, b) for a, b in zip(first.memories[0].masks, resumed.memories[0].masks)
    ] == [True, True]
    assert resumed.calibration.prefixes == first.calibration.prefixes
    assert resumed.calibration.score_scale == first.calibration.score_scale
    for prompt, target in EDITS[3:5]:
        resumed.edit(prompt, target)
    for a, b in zip(straight.memories, resumed.memories):
        assert torch.equal(a.delta, b.delta)
        assert a.epsilon == b.epsilon  # prompt activations recomputed exactly after load
    assert [r["memory"] for r in straight.edit_log] == [r["memory"] for r in resumed.edit_log]


def test_target_that_tokenizes_to_nothing(tokenizer):
    class Dropping:
        """A tokenizer that, like many, drops characters it has no token for."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, text, *args, **kwargs):
            return self.inner(text.replace("\u2603", ""), *args, **kwargs)

    editor = WiseEditor(tiny_model(), Dropping(tokenizer), fast_config())
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        editor.edit("Who?", "\u2603")
    assert editor.num_edits == 0 and not editor.memories


def test_model_parameters_keep_their_flags_and_stay_unchanged(tokenizer):
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    model.train()
    editor = WiseEditor(model, tokenizer, fast_config())
    editor.edit(*EDITS[0])
    assert model.training
    assert flags == {
        k.replace(".base_layer", ""): p.requires_grad for k, p in model.named_parameters()
    }
    weights = {k: v for k, v in model.state_dict().items() if ".memories." not in k}
    assert len(weights) == len(state)  # beside the model's own: the side memories, peft-like
    for key, value in weights.items():
        assert torch.equal(value, state[key.replace(".base_layer", "")])


def test_half_precision_model_edits_without_nan(tokenizer):
    model = tiny_model(dtype=torch.bfloat16)
    editor = WiseEditor(model, tokenizer, fast_config())
    batch = tokenizer([EDITS[0][0]], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    editor.edit(*EDITS[0])
    delta = editor.memories[0].delta
    assert delta.dtype == torch.float32 and torch.isfinite(delta).all() and delta.abs().sum() > 0
    with torch.no_grad():
        after = model(**batch).logits
    assert after.dtype == torch.bfloat16 and not torch.equal(before, after)
    batch = tokenizer([EDITS[0][0]], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_biased_value_projection_keeps_its_bias(tokenizer):
    model = tiny_model("gptj")
    layer_module = model.transformer.h[2].mlp.fc_out
    assert layer_module.bias is not None
    torch.nn.init.normal_(layer_module.bias, std=1.0)
    editor = WiseEditor(model, tokenizer, fast_config())
    acts = torch.randn(2, 3, layer_module.in_features)
    assert torch.equal(editor.layer(acts), layer_module(acts))  # no memory yet: base, bias
    delta = torch.randn(layer_module.weight.shape) * 0.1
    with editor.layer.trial(delta):
        torch.testing.assert_close(editor.layer(acts), layer_module(acts) + acts @ delta.t())


def test_rehearsal_keeps_a_memorys_earlier_edits(tokenizer):
    """Five edits into one memory: without rehearsal the later ones overwrite the first;
    with the memory's earlier edits rehearsed the first edit keeps its answer."""
    from wise_edit.metrics import target_nll

    def first_edits_nll(rehearse: int) -> list[float]:
        config = fast_config(
            mode="retrieve", shard_size=5, shards_per_merge=1, rehearse_rows=rehearse, max_steps=30
        )
        editor = WiseEditor(tiny_model(), tokenizer, config)
        editor.edit_many(EDITS[:5])
        assert len(editor.memories) == 1
        return [target_nll(editor.model, editor.format, p, t) for p, t in EDITS[:4]]

    without, with_rehearsal = first_edits_nll(0), first_edits_nll(4)
    assert with_rehearsal[0] < without[0] - 2.0
    assert sum(with_rehearsal) < sum(without) - 4.0


def test_rehearsal_draws_from_the_memory_being_trained(tokenizer):
    editor = WiseEditor(
        tiny_model(),
        tokenizer,
        fast_config(mode="retrieve", shard_size=3, shards_per_merge=1, rehearse_rows=2),
    )
    editor.edit_many(EDITS[:4])  # memory 0: edits 0-2 (closed), memory 1: edit 3
    bank = editor.bank
    plan = bank.plan()
    assert plan.held == (3,)  # a new edit goes to memory 1, next to edit 3 only
    assert bank.rehearsal_ids(plan, 4) == [3]
    ((rows, _),) = editor._rehearsal(bank.rehearsal_ids(plan, 4))
    assert rows.input_ids.shape[0] == 1
    full = bank.plan_in(editor.memories[0], 0)
    drawn = bank.rehearsal_ids(full, 5)  # three held, two drawn, seeded by index, in order
    assert len(drawn) == 2 and drawn == sorted(drawn) and set(drawn) < {0, 1, 2}
    assert bank.rehearsal_ids(full, 5) == drawn
    ((rows, _),) = editor._rehearsal(drawn)
    assert rows.input_ids.shape[0] == 2
    assert bank.rehearsal_ids(bank.plan_in(None, 2), 4) == []


def test_prefixes_per_step_takes_the_prefixed_rows_in_turn(tokenizer):
    editor = WiseEditor(tiny_model(), tokenizer, fast_config(**{"prefixes.per_step": 1}))
    rows = editor._edit_rows(*EDITS[0])
    lower = editor._capture(rows)
    assert len(rows.input_ids) == 3  # the bare prompt and two prefixes
    picked = [editor._step_rows(rows, lower, step)[0] for step in range(3)]
    for taken, index in zip(picked, ([0, 1], [0, 2], [0, 1])):
        expected, start = rows.take(index)
        assert torch.equal(taken.input_ids, expected.input_ids)
    assert editor._step_rows(rows, lower, 0)[1].acts.shape[0] == 2
    result = editor.edit(*EDITS[0])
    assert result.steps >= 1 and editor.routed([EDITS[0][0]]) == [0]
    everything = WiseEditor(tiny_model(), tokenizer, fast_config())
    assert everything._step_rows(rows, lower, 5)[0] is rows
