"""Routing: edited prompts use the side memory, everything else is the unedited model bit
for bit, per row of any batch, and generation keeps the prompt's decision."""

import json

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model
from safetensors.torch import load_file, save_file

from wise_edit import WiseEditor
from wise_edit.neutral import NEUTRAL_PROMPTS
from wise_edit.wise.router import mean_inputs


def edit_keys(editor):
    """Every edit's key (E, I) and the memory holding it (E,), in memory order."""
    keys = [m.keys for m in editor.memories]
    owners = [torch.full((len(k),), i) for i, k in enumerate(keys)]
    return torch.cat(keys).clone(), torch.cat(owners)


def prompt_keys(editor, prompts):
    """Each prompt's key, the mean value-matrix input over the tokens routing reads."""
    return mean_inputs(*editor._prompt_batch_acts(list(prompts))).float()


def nearness(queries, keys, owners, memories):
    """(M, B): each memory's best cosine between a query and one of its keys."""
    unit = torch.nn.functional.normalize
    sims = (unit(queries, dim=-1) @ unit(keys, dim=-1).t()).t()  # (E, B)
    out = torch.full((memories, sims.shape[1]), float("-inf"))
    return out.scatter_reduce(0, owners[:, None].expand_as(sims), sims, reduce="amax")


UNRELATED = [
    "Tomorrow we will paint the fence in the garden.",
    "The bakery on the corner sells warm croissants.",
]


@pytest.fixture(scope="module")
def edited(request):
    from conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    # a routing margin weight that separates the tiny model's prompts with room to spare
    editor = WiseEditor(model, tokenizer, fast_config(max_steps=25, margin_weight=3.0))
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    return editor


def _batch(editor, prompts):
    return editor.tokenizer(prompts, return_tensors="pt", padding=True)


def _logits(editor, batch):
    with torch.no_grad():
        return editor(**batch).logits


def test_edit_prompts_route_to_side_memory_and_unrelated_do_not(edited):
    prompts = [p for p, _ in EDITS[:3]]
    assert edited.routed(prompts) == [0, 0, 0]
    assert edited.routed(UNRELATED) == [-1, -1]


def test_without_the_router_unrelated_prompts_take_the_side_memory(edited):
    """``routing.gate`` False (the paper's "w.o. router"): the same memories, no gate."""
    edited.layer.gate = False
    try:
        assert edited.routed(UNRELATED) == [0, 0]
    finally:
        edited.layer.gate = True
    assert edited.routed(UNRELATED) == [-1, -1]
    config = fast_config(**{"routing.gate": False})
    assert config.routing.gate is False
    assert WiseEditor(tiny_model("llama"), edited.tokenizer, config).layer.gate is False


def test_out_of_scope_logits_equal_unedited_bit_for_bit(edited):
    batch = _batch(edited, UNRELATED)
    after = _logits(edited, batch)
    with edited.layer.disabled():
        before = _logits(edited, batch)
    assert torch.equal(after, before)


def test_mixed_batch_each_row_decides_alone(edited):
    prompts = [EDITS[0][0], UNRELATED[0], EDITS[1][0], UNRELATED[1]]
    batch = _batch(edited, prompts)
    after = _logits(edited, batch)
    with edited.layer.disabled():
        before = _logits(edited, batch)
    assert torch.equal(after[1], before[1]) and torch.equal(after[3], before[3])
    assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[2], before[2])
    # the same rows alone, and in a batch of one, decide the same way
    single = _logits(edited, _batch(edited, [UNRELATED[0]]))
    with edited.layer.disabled():
        single_before = _logits(edited, _batch(edited, [UNRELATED[0]]))
    assert torch.equal(single, single_before)


def test_padding_does_not_enter_the_score(edited):
    alone = edited.activation_scores([EDITS[0][0]])
    padded = edited.activation_scores([EDITS[0][0], NEUTRAL_PROMPTS[0] * 3])
    torch.testing.assert_close(alone[:, 0], padded[:, 0], atol=1e-4, rtol=1e-4)


def test_generation_keeps_the_prompt_decision(edited):
    prompts = [EDITS[0][0], UNRELATED[0]]
    batch = _batch(edited, prompts)
    generated = edited.generate(**batch, max_new_tokens=6, do_sample=False)
    memory = edited.memories[0]
    with edited.layer.trial(memory.delta):  # side memory for every token
        forced = edited.generate(**batch, max_new_tokens=6, do_sample=False)
    with edited.layer.disabled():  # main memory for every token
        plain = edited.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated[0], forced[0])
    assert torch.equal(generated[1], plain[1])


def test_decode_steps_reuse_the_prefill_decision(edited):
    """Count the routing decisions: one per generate call, not one per token."""
    decisions = []
    original = edited.layer.route

    def counting(acts, token_mask):
        decisions.append(acts.shape[1])
        return original(acts, token_mask)

    edited.layer.route = counting
    try:
        batch = _batch(edited, [EDITS[0][0]])
        edited.generate(**batch, max_new_tokens=5, do_sample=False)
    finally:
        del edited.layer.route
    assert decisions == [batch["input_ids"].shape[1]]


def test_routing_with_several_memories_is_top1(tokenizer):
    model = tiny_model("llama", seed=3)
    editor = WiseEditor(
        model,
        tokenizer,
        fast_config(mode="retrieve", shard_size=1, shards_per_merge=1, max_steps=25, replay=True),
    )
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    assert len(editor.memories) == 3 and all(m.closed for m in editor.memories)
    assert editor.routed([p for p, _ in EDITS[:3]]) == [0, 1, 2]
    assert editor.routed(UNRELATED) == [-1, -1]


def test_retrieval_index_routes_like_scoring_every_memory(tokenizer, tmp_path):
    """Keys of the nearest edits pick the memories to score; on these edits the decision
    equals the dense one, and keys survive a save (and are rebuilt for older saves)."""
    config = fast_config(mode="retrieve", shard_size=1, shards_per_merge=1, max_steps=25)
    dense = WiseEditor(tiny_model("llama", seed=3), tokenizer, config)
    dense.edit_many(EDITS[:4])
    prompts = [p for p, _ in EDITS[:4]] + UNRELATED
    expected = dense.routed(prompts)
    assert expected[:4] == [0, 1, 2, 3]
    dense.save_pretrained(tmp_path / "s")
    config_file = tmp_path / "s" / "editor_config.json"
    data = json.loads(config_file.read_text())
    data["routing"]["candidates"] = 2
    config_file.write_text(json.dumps(data))
    sparse = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    assert sparse.layer.candidates == 2 and len(sparse.memories) == 4
    assert [len(m.keys) for m in sparse.memories] == [1, 1, 1, 1]
    assert sparse.routed(prompts) == expected
    keys = [m.keys.clone() for m in sparse.memories]
    sparse.detach()
    tensors = load_file(str(tmp_path / "s" / "editor_model.safetensors"))
    for i in range(4):  # a save from before the index: keys are recomputed, the same
        del tensors[f"memories.{i}.keys"]
    save_file(tensors, str(tmp_path / "s" / "editor_model.safetensors"))
    state_file = tmp_path / "s" / "editor_state.json"
    state = json.loads(state_file.read_text())
    state.pop("tensor_sha256")
    state_file.write_text(json.dumps(state))
    old = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    assert all(torch.equal(a, m.keys) for a, m in zip(keys, old.memories))


def test_route_scores_with_the_index_are_the_best_of_the_nearest_keys_memories(tokenizer):
    """Fig. 3's score: dense, the best of every memory; with the index, the best of the
    memories of the row's k nearest edit keys (none left out by the key radius)."""
    config = fast_config(mode="retrieve", shard_size=1, shards_per_merge=1, max_steps=10)
    editor = WiseEditor(tiny_model("llama", seed=3), tokenizer, config)
    editor.edit_many(EDITS[:4])
    prompts = [p for p, _ in EDITS[:4]] + UNRELATED
    layer = editor.layer
    acts, mask = editor._prompt_batch_acts(prompts)
    every = layer.scores(acts, mask)  # (M, B)
    layer.candidates = 0
    assert torch.equal(layer.route_scores(acts, mask), every.max(dim=0).values)
    layer.candidates, layer.radius = 1, 0.999  # the radius would leave rows without any
    keys, owners = edit_keys(editor)
    queries = torch.nn.functional.normalize(mean_inputs(acts, mask).float(), dim=-1)
    near = owners[(queries @ torch.nn.functional.normalize(keys, dim=-1).t()).topk(1).indices]
    expected = torch.stack([every[near[b], b].max() for b in range(len(prompts))])
    got = layer.route_scores(acts, mask)
    assert torch.equal(got, expected) and torch.isfinite(got).all()
    assert not torch.equal(got, every.max(dim=0).values)  # some row's best is left out


def test_the_retrieval_index_follows_every_edit_and_is_not_handed_out(tokenizer):
    """The layer joins the memories' keys once and keeps them; a new edit (a new memory,
    or a key added to an open one) must reach routing at once."""
    config = fast_config(mode="retrieve", shard_size=2, shards_per_merge=1, max_steps=25)
    editor = WiseEditor(tiny_model("llama", seed=3), tokenizer, config)
    editor.layer.candidates = 1
    prompts = [p for p, _ in EDITS[:3]]
    for count, (prompt, target) in enumerate(EDITS[:3], start=1):
        editor.edit(prompt, target)
        keys, owners = edit_keys(editor)
        assert len(keys) == count and owners.tolist() == [0, 0, 1][:count]
        editor.routed(prompts)  # builds (or reuses) the index
    assert editor.routed(prompts)[2] == 1  # the third edit, in the second memory
    assert editor.routed(prompts)[2] == 1


def test_key_radius_keeps_memories_to_prompts_worded_like_their_edits(tokenizer, tmp_path):
    """A prompt with words added routes to its edit's memory by score alone; a radius
    tighter than its key's cosine to the edit's (the edit prompts' own keys are within
    it) leaves it on the main memory, on the dense path and through the index, and the
    radius is saved with the editor."""
    config = fast_config(mode="retrieve", shard_size=1, shards_per_merge=1, max_steps=25)
    editor = WiseEditor(tiny_model("llama", seed=3), tokenizer, config)
    editor.edit_many(EDITS[:4])
    worded = [p for p, _ in EDITS[:4]] + [p + " Tell me." for p, _ in EDITS[:4]]
    assert editor.routed(worded) == [0, 1, 2, 3] * 2
    keys, owners = edit_keys(editor)
    near = nearness(prompt_keys(editor, worded), keys, owners, 4).max(dim=0).values
    assert (near[:4] > 0.9999).all() and (near[4:] < 0.99).all()
    editor.save_pretrained(tmp_path / "s")
    config_file = tmp_path / "s" / "editor_config.json"
    data = json.loads(config_file.read_text())
    for candidates in (0, 2):
        routing = {**data["routing"], "key_radius": 0.99, "candidates": candidates}
        config_file.write_text(json.dumps({**data, "routing": routing}))
        gated = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
        assert gated.layer.radius == 0.99 and gated.layer.candidates == candidates
        assert gated.routed(worded) == [0, 1, 2, 3] + [-1] * 4


def test_the_default_key_radius_is_calibrated_on_neutral_text_once_and_saved(tokenizer, tmp_path):
    from wise_edit.wise.calibration import RADIUS_QUANTILE, background_radius

    config = fast_config(mode="retrieve", shard_size=1, shards_per_merge=1, max_steps=25)
    assert config.routing.key_radius is None
    editor = WiseEditor(tiny_model("llama", seed=3), tokenizer, config)
    expected = background_radius(prompt_keys(editor, NEUTRAL_PROMPTS), RADIUS_QUANTILE)
    assert editor.key_radius == editor.layer.radius == expected  # measured when made
    editor.edit_many(EDITS[:2])
    assert 0.0 < expected < 1.0
    assert editor.key_radius == editor.layer.radius == expected
    assert editor.summary()["key_radius"] == expected
    prompts = [p for p, _ in EDITS[:2]] + UNRELATED
    routed = editor.routed(prompts)
    editor.save_pretrained(tmp_path / "s")
    loaded = WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")
    assert loaded.key_radius == loaded.layer.radius == expected
    assert loaded.routed(prompts) == routed


def test_a_saved_key_radius_outside_zero_one_is_refused(tokenizer, tmp_path):
    from wise_edit.core.validate import CorruptSaveError

    editor = WiseEditor(tiny_model("llama", seed=3), tokenizer, fast_config())
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "s")
    state_file = tmp_path / "s" / "editor_state.json"
    state = json.loads(state_file.read_text())
    state.pop("tensor_sha256", None)
    state_file.write_text(json.dumps({**state, "key_radius": 1.5}))
    with pytest.raises(CorruptSaveError, match="key_radius must be at most 1.0"):
        WiseEditor.from_pretrained(tiny_model("llama", seed=3), tokenizer, tmp_path / "s")


class _RoutedStub:
    """An editor whose routing is fixed: edit i lives in memory ``holders[i]``, and each
    prompt goes where ``choices`` says."""

    routes = True

    def __init__(self, holders, choices):
        self.holders, self.choices = holders, choices

    def memory_holding(self, edit_id):
        return self.holders[edit_id]

    def routing_detail(self, prompts):
        return [self.choices[p] for p in prompts], None

    def summary(self):
        return {}


def test_the_routing_report_separates_some_memory_from_the_memory_holding_the_edit():
    from wise_edit.bench import routing_scores
    from wise_edit.data import EditRecord

    records = [
        EditRecord("p0", "a", rephrase="r0", loc="l0"),
        EditRecord("p1", "b", rephrase="r1", loc="l1"),
        EditRecord("p2", "c", loc="l2"),  # no paraphrase
    ]
    # p1 and r0 are taken by another edit's memory, r1 by none; one locality probe leaks
    choices = {"p0": 0, "p1": 0, "p2": 1, "r0": 1, "r1": -1, "l0": -1, "l1": 1, "l2": -1}
    summary = routing_scores(_RoutedStub([0, 1, 1], choices), records)["summary"]
    assert summary["share_routed_to_side_memory"] == {
        "edit prompts": 1.0,
        "paraphrases": 0.5,
        "unrelated": pytest.approx(1 / 3),
    }
    assert summary["share_routed_to_own_memory"] == {
        "edit prompts": pytest.approx(2 / 3),
        "paraphrases": 0.0,
    }
    # a method that cannot name an edit's memory reports only reaching some memory
    unnamed = routing_scores(_RoutedStub([None, None, None], choices), records)["summary"]
    assert "share_routed_to_own_memory" not in unnamed


# ---------------------------------------------------------------------- routing
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_decision_per_prompt_without_a_kv_cache(family, tokenizer):
    editor = WiseEditor(tiny_model(family), tokenizer, fast_config(max_steps=25))
    editor.edit_many(EDITS[:2])
    decisions = []
    original = editor.layer.route
    editor.layer.route = lambda acts, mask: decisions.append(acts.shape[1]) or original(acts, mask)
    for prompt in [EDITS[0][0], "The weather today is mild and calm."]:
        batch = tokenizer([prompt], return_tensors="pt")
        decisions.clear()
        plain = editor.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
        assert decisions == [batch["input_ids"].shape[1]]  # decided once, from the prompt
        cached = editor.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
        assert torch.equal(plain, cached)
    del editor.layer.route
