"""ROME, MEMIT, MEMIT-MASS and AlphaEdit on tiny models: each editor's update has its
method's defining property, read off the update it really committed; the layers they
edit; the lookup token; and the key statistics' cache."""

import json

import pytest
import torch
import transformers
from conftest import EDITS, tiny_model, tiny_tokenizer
from editors import LOCATE, SETUPS, STATS_DIR, make

import wise_edit.baselines.layer_stats as layer_stats
import wise_edit.baselines.memit as memit
import wise_edit.baselines.rome as rome
from wise_edit.baselines import (
    AlphaEditConfig,
    MEMITConfig,
    MEMITMassConfig,
    ROMEConfig,
    ROMEEditor,
)
from wise_edit.baselines.layer_stats import load_or_measure, model_fingerprint

SUBJECT_EDIT = ("Who designed Lahti Town Hall?", "Eliel Saarinen", "Lahti Town Hall")


def _spy(monkeypatch, module, name):
    """Record every call of ``module.name`` (its arguments and result)."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args + tuple(kwargs.values()), out))
        return out

    monkeypatch.setattr(module, name, spy)
    return calls


def _deltas(editor):
    return {i: layer.delta.clone().double() for i, layer in editor.deltas.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_rome_writes_the_value_at_the_key_with_one_direction(monkeypatch, family):
    editor = make("rome", family)
    editor.edit(*EDITS[0])  # an earlier edit: the update builds on it
    before = _deltas(editor)[2]
    calls = _spy(monkeypatch, rome, "rome_update")
    values, plans = [], []
    real_fit = editor._fit_value

    def fit(plan):
        plans.append(plan)
        values.append(real_fit(plan))
        return values[-1]

    monkeypatch.setattr(editor, "_fit_value", fit)
    editor.edit(*SUBJECT_EDIT[:2], subject=SUBJECT_EDIT[2])
    (key, _, moment, raw), _ = calls[0]
    v_star = values[0][1]
    # W' k = v* at the raw prompt's key (rome/compute_v.py's right vector)
    torch.testing.assert_close(editor._outputs(2, raw[:, None])[:, 0], v_star, rtol=1e-5, atol=1e-5)
    change = _deltas(editor)[2] - before
    s = torch.linalg.svdvals(change)
    assert s[1] < 1e-5 * s[0]  # rank one (up to the fp32 the delta is kept in)
    # along u = C^-1 k*, k* the mean key over the rows (rome/compute_u.py)
    u = torch.linalg.solve(moment, key)
    direction = torch.linalg.svd(change).Vh[0]
    assert abs(direction @ u) / u.norm() > 1 - 1e-5
    torch.testing.assert_close(moment, editor.key_stats(2).moment)
    with editor._trials({2: before.float()}):  # the keys as the update saw them
        keys = editor._row_keys(plans[0], 2)
    torch.testing.assert_close(key, keys.mean(0))
    torch.testing.assert_close(raw, keys[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rome_gives_the_edited_prompt_its_value(monkeypatch, family):
    """After the edit, the raw prompt alone (unpadded, a plain forward) has v* as the
    value matrix's output at the subject's last token: the value that was optimised for
    it, not v* shifted by W (k - k*) as when the mean key k* is mapped to v*."""
    editor = make("rome", family)
    editor.edit(*EDITS[0])
    values = []
    real_fit = editor._fit_value
    monkeypatch.setattr(editor, "_fit_value", lambda p: values.append(real_fit(p)) or values[-1])
    prompt, target, subject = SUBJECT_EDIT
    editor.edit(prompt, target, subject=subject)
    tok = editor.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    at = next(i for i in range(ids.shape[1]) if tok.decode(ids[0, : i + 1]).endswith(subject))
    seen = {}
    handle = editor.layer.register_forward_hook(lambda m, a, out: seen.setdefault("v", out))
    with torch.no_grad():
        editor.model(input_ids=ids)
    handle.remove()
    torch.testing.assert_close(seen["v"][0, at].double(), values[0][1], rtol=1e-4, atol=1e-4)


def test_the_lookup_token_is_the_subjects_last():
    editor = make("rome")
    prompt, target, subject = SUBJECT_EDIT
    rows = editor._edit_rows(prompt, target)
    positions = editor._lookup(rows, subject)
    tok = editor.tokenizer
    for row, at in zip(rows.input_ids.tolist(), positions.tolist()):
        assert tok.decode(row[: at + 1]).endswith(subject)
    # without a subject: the prompt's last token
    last = editor._lookup(rows, None)
    n = rows.targets.shape[1]
    assert last.tolist() == [rows.input_ids.shape[1] - n - 1] * len(last)


@pytest.mark.parametrize("method", ["memit", "memit-mass"])
def test_memit_solves_each_layers_least_squares(monkeypatch, method):
    editor = make(method, "gpt2")
    editor.edit(*EDITS[0])
    before = _deltas(editor)
    calls = _spy(monkeypatch, memit, "memit_update")
    editor.edit_many([EDITS[1], EDITS[2]] if method == "memit-mass" else [EDITS[1]])
    assert [len(c[0][0].t()) for c in calls] == [2 if method == "memit-mass" else 1] * 2
    after = _deltas(editor)
    for index, ((keys, residuals, moment, weight), _) in zip(editor.edited, calls):
        chol = torch.linalg.cholesky(moment.double())
        system = torch.cat([keys.t(), weight**0.5 * chol.t()])
        rhs = torch.cat(
            [residuals.t(), torch.zeros(len(moment), len(residuals), dtype=torch.float64)]
        )
        direct = torch.linalg.lstsq(system, rhs).solution.t()
        torch.testing.assert_close(after[index] - before[index], direct, rtol=1e-4, atol=1e-5)


def test_memit_spreads_the_residual_over_its_layers(monkeypatch):
    """Layer i of L gets 1/(L - i) of what is still missing at the last layer, z - h,
    with h read after the layers below it were updated."""
    editor = make("memit")
    editor.edit(*EDITS[0])
    before = _deltas(editor)
    calls = _spy(monkeypatch, memit, "memit_update")
    seen = []
    real_fit, real_plan = editor._fit_value, editor._plan
    monkeypatch.setattr(editor, "_plan", lambda r: seen.append(real_plan(r)) or seen[-1])
    monkeypatch.setattr(editor, "_fit_value", lambda p: seen.append(real_fit(p)) or seen[-1])
    editor.edit(*EDITS[1])
    plan, (_, z) = seen
    assert editor.edited == [1, 2]
    after = {i: d.float() for i, d in _deltas(editor).items()}
    with torch.no_grad(), editor._trials({i: d.float() for i, d in before.items()}):
        h0 = editor._last_states([plan])[:, 0]
    with torch.no_grad(), editor._trials({1: after[1], 2: before[2].float()}):
        h1 = editor._last_states([plan])[:, 0]
    (_, first, _, _), _ = calls[0]
    (_, last, _, _), _ = calls[1]
    torch.testing.assert_close(first[:, 0], (z - h0) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last[:, 0], z - h1, rtol=1e-5, atol=1e-5)


def test_memit_mass_edits_the_whole_stream_in_one_update():
    editor = make("memit-mass")
    assert editor.edit_batch is None and make("memit").edit_batch == 1
    results = editor.edit_many(EDITS[:3])
    assert [r.index for r in results] == [0, 1, 2]
    assert [e["batch"] for e in editor.edit_log] == [3, 3, 3]


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged():
    editor = make("alphaedit", "gptj")
    editor.edit(*EDITS[0])
    before = _deltas(editor)
    prior_before = {i: p.clone() for i, p in editor.prior.items()}
    editor.edit(*EDITS[1])
    after = _deltas(editor)
    threshold = editor.config.nullspace_threshold
    for index in editor.edited:
        stats = editor.key_stats(index)
        preserved = stats.eigenvectors[:, stats.eigenvalues >= threshold]  # P K0 = 0
        change = after[index] - before[index]
        assert change.abs().max() > 1e-3
        assert (change @ preserved).abs().max() < 1e-5 * change.abs().max()
        # the edit's keys join the ones later edits keep out of the way of
        assert not torch.equal(editor.prior[index], prior_before[index])
        torch.testing.assert_close(editor.prior[index], editor.prior[index].t())


def test_default_layers_keep_the_papers_relative_depths():
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=30,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=320,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert ROMEConfig().resolve_layer(model) == 4  # LLaMA-2-7B's 5 of 32
    memit_config = MEMITConfig()
    assert memit_config.edited_layers(memit_config.resolve_layer(model)) == [3, 4, 5, 6, 7]
    assert AlphaEditConfig().resolve_layer(model) == 7
    assert MEMITMassConfig().batch_size is None
    with pytest.raises(ValueError, match="span"):
        MEMITConfig(span=0)


def test_a_save_refuses_a_model_whose_other_edited_layer_differs(tmp_path):
    editor = make("memit")
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "s")
    other = tiny_model()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.add_(1.0)  # not the primary (2)
    cls = type(editor)
    with pytest.raises(ValueError, match="different model or layer"):
        cls.from_pretrained(other, editor.tokenizer, tmp_path / "s")
    assert type(other.model.layers[1].mlp.down_proj).__name__ == "Linear"
    assert type(other.model.layers[2].mlp.down_proj).__name__ == "Linear"


def test_detach_restores_every_edited_layer():
    model = tiny_model()
    originals = [model.model.layers[i].mlp.down_proj for i in range(4)]
    cls, config = SETUPS["alphaedit"]
    editor = cls(model, tiny_tokenizer(), config())
    editor.edit(*EDITS[0])
    editor.detach()
    assert [model.model.layers[i].mlp.down_proj for i in range(4)] == originals


# ---------------------------------------------------------------------- key statistics
def _measure(model, tmp_path, corpus="neutral", tokens=10_000, layers=(2,)):
    paths = {f"model.layers.{i}.mlp.down_proj": model.model.layers[i].mlp.down_proj for i in layers}
    stats = load_or_measure(model, tiny_tokenizer(), paths, corpus, tokens, cache_dir=tmp_path)
    assert list(stats) == list(paths)
    return stats if len(layers) > 1 else stats[next(iter(paths))]


def test_the_moment_is_the_mean_outer_product_of_the_real_tokens_keys(tmp_path):
    model, tok = tiny_model(), tiny_tokenizer()
    stats = _measure(model, tmp_path)
    keys = []
    handle = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: keys.append(a[0][0].double())
    )
    with torch.no_grad():
        for text in layer_stats.corpus_texts("neutral"):
            model(**tok([text], return_tensors="pt"))
    handle.remove()
    keys = torch.cat(keys)
    assert stats.tokens == len(keys)
    # left-padded batches against one text at a time: fp32 rounding apart
    torch.testing.assert_close(stats.moment, keys.t() @ keys / len(keys), rtol=1e-4, atol=1e-5)
    values, vectors = stats.eigenvalues, stats.eigenvectors
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.t(), stats.moment)


def test_the_cache_is_reused_rebuilt_when_stale_and_never_shared_across_models(
    tmp_path, monkeypatch
):
    model = tiny_model()
    first = _measure(model, tmp_path, tokens=300)
    (meta_file,) = tmp_path.glob("*.json")
    meta = json.loads(meta_file.read_text())
    assert meta["tokens"] == first.tokens == 300 and meta["module"].endswith("2.mlp.down_proj")
    assert meta["model_fingerprint"] == model_fingerprint(model)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    calls = _spy(monkeypatch, layer_stats, "measure_moments")
    again = _measure(model, tmp_path, tokens=300)
    assert not calls and torch.equal(again.moment, first.moment)
    # another model, another token budget: measured, in another file
    _measure(tiny_model(seed=1), tmp_path, tokens=300)
    _measure(model, tmp_path, tokens=200)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.json"))) == 3
    # a damaged cache is measured again
    meta_file.with_suffix(".safetensors").write_bytes(b"not tensors")
    rebuilt = _measure(model, tmp_path, tokens=300)
    assert len(calls) == 3 and torch.equal(rebuilt.moment, first.moment)
    # a cache whose record does not match (edited by hand, older format) is too
    meta_file.write_text(json.dumps({**meta, "format_version": 0}))
    _measure(model, tmp_path, tokens=300)
    assert len(calls) == 4


def test_several_layers_are_measured_in_one_pass_as_each_alone(tmp_path, monkeypatch):
    model = tiny_model()
    alone = {i: _measure(model, tmp_path / f"alone{i}", tokens=300, layers=(i,)) for i in (1, 3)}
    calls = _spy(monkeypatch, layer_stats, "measure_moments")
    cached = _measure(model, tmp_path / "both", tokens=300, layers=(1,))
    both = _measure(model, tmp_path / "both", tokens=300, layers=(1, 2, 3))
    assert len(calls) == 2  # layer 1 once; layers 2 and 3 in one pass, 1 from its cache
    assert len(calls[1][0][2]) == 2
    assert torch.equal(both["model.layers.1.mlp.down_proj"].moment, cached.moment)
    for i in (1, 3):
        stats = both[f"model.layers.{i}.mlp.down_proj"]
        assert stats.tokens == alone[i].tokens == 300
        torch.testing.assert_close(stats.moment, alone[i].moment)


def test_the_corpus_is_the_data_folders_passages_or_a_text_file(tmp_path):
    folder = tmp_path / "data" / "hallucination"
    folder.mkdir(parents=True)
    record = {
        "prompt": "A passage.",
        "target_new": "New.",
        "locality_prompt": "Lo",
        "locality_ground_truth": "cal.",
    }
    (folder / "hallucination-edit.json").write_text(json.dumps([record]))
    assert layer_stats.corpus_texts(str(tmp_path / "data")) == ["A passage.", "Local."]
    (tmp_path / "texts.txt").write_text("one\n\ntwo\n")
    assert layer_stats.corpus_texts(str(tmp_path / "texts.txt")) == ["one", "two"]
    with pytest.raises(FileNotFoundError, match="no text for the key statistics"):
        layer_stats.corpus_texts(str(tmp_path / "nothing"))


def test_an_editor_measures_the_unedited_models_statistics(tmp_path):
    """C of a later layer is read with every edit switched off: the same as a fresh model's."""
    cls, config = SETUPS["memit"]
    editor = cls(tiny_model(), tiny_tokenizer(), config(stats_dir=str(tmp_path)))
    editor.edit(*EDITS[0])
    editor._stats.clear()
    for path in tmp_path.iterdir():
        path.unlink()
    fresh = _measure(tiny_model(), tmp_path / "fresh")
    torch.testing.assert_close(editor.key_stats(2).moment, fresh.moment)
    assert ROMEEditor is not None and LOCATE["stats_dir"] == STATS_DIR


# ---------------------------------------------------------------------- the harness
@pytest.mark.parametrize("method", ["rome", "memit-mass", "alphaedit"])
def test_bench_runs_the_method_and_hands_memit_mass_one_batch(tmp_path, monkeypatch, method):
    from wise_edit.cli import main

    tiny_model().save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "zsre").mkdir(parents=True)
    rows = [
        {
            "src": p,
            "alt": t,
            "rephrase": p + " Tell me.",
            "loc": "nq: who",
            "loc_ans": "nobody",
            "subject": p.rstrip("?").split()[-1],
            "pred": "x",
            "answers": ["x"],
        }
        for p, t in EDITS
    ]
    for name in ("zsre_edit.json", "zsre_loc_1k.json"):
        (tmp_path / "data" / "zsre" / name).write_text(json.dumps(rows))
    batches = []
    cls = type(make(method))
    real = cls._edit_batch
    monkeypatch.setattr(
        cls, "_edit_batch", lambda self, i, m: batches.append(len(i)) or real(self, i, m)
    )
    settings = {
        "stats_corpus": "neutral",
        "stats_dir": STATS_DIR,
        "layer": 2,
        "max_steps": 3,
        "context_count": 1,
        "context_lengths": "[2]",
    }
    if method != "rome":
        settings.update(span=2)
    sets = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    argv = [
        "bench",
        "--method",
        method,
        "--model",
        str(tmp_path / "model"),
        "--data-dir",
        str(tmp_path / "data"),
        "--edits",
        "4",
        "--out",
        str(tmp_path / "out"),
        "--latency-repeats",
        "1",
        *sets,
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["edits"] == 4 and result["scores"]["teacher_forced"]["loc"] is not None
    assert batches == ([4] if method == "memit-mass" else [1, 1, 1, 1])


def test_memits_moment_weight_is_kept_per_input_dimension():
    from wise_edit.baselines.memit import MEMITConfig

    assert MEMITConfig().resolved_moment_weight(16384) == 15000.0  # GPT-J's, where it was set
    assert MEMITConfig().resolved_moment_weight(1536) == 1406.25
    assert MEMITConfig(moment_weight=7.0).resolved_moment_weight(1536) == 7.0
    with pytest.raises(ValueError, match="moment_weight"):
        MEMITConfig(moment_weight=0.0)
