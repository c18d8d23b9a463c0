"""The protocol on a tiny model: sequential edits, final-model scores, pre-edit scores,
chunked rollback, and the bench outputs."""

import json

import pytest
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor
from wise_edit.core.prompts import PromptFormat
from wise_edit.data import EditRecord
from wise_edit.evaluation import (
    ANSWER_EM,
    _slice_baseline,
    kinds_for,
    locality_baseline,
    run_protocol,
    score,
)
from wise_edit.metrics import Decoder

RECORDS = [
    EditRecord(
        p,
        t,
        rephrase=p.replace("?", " please?"),
        loc="The bakery sells bread.",
        loc_ans="every day",
    )
    for p, t in EDITS[:4]
]


def test_unedited_model_scores_locality_one(tokenizer):
    model, fmt = tiny_model(), PromptFormat.create(tokenizer)
    base = locality_baseline(model, fmt, RECORDS)
    for kind in kinds_for(fmt):
        scores = score(kind, model, fmt, RECORDS, base)
        assert scores.loc == (1.0 if kind.probe is not None else None)
    # a random tiny model generates none of the targets
    assert score(ANSWER_EM, model, fmt, RECORDS, base).rel == 0.0


def test_protocol_edits_then_scores_the_final_model(tokenizer, capsys):
    model = tiny_model()
    made = []

    def make():
        made.append(WiseEditor(model, tokenizer, fast_config(max_steps=20, lr=0.05)))
        return made[-1]

    fmt = PromptFormat.create(tokenizer)
    result, editor = run_protocol(
        model, fmt, RECORDS, make, method="WISE", mode="merge", dataset="toy", progress=False
    )
    assert capsys.readouterr().err == ""  # no bar: neither the edits' nor the decodings'
    assert len(made) == 1 and editor.num_edits == 4
    assert result.edits == 4 and result.seconds_per_edit > 0 and result.peak_memory_mb > 0
    assert result.scores["teacher_forced"].rel > result.pre_edit["teacher_forced"].rel
    kinds = {"teacher_forced", "answer_em", "prefix_em"}
    assert set(result.pre_edit) == set(result.scores) == kinds
    data = json.loads(json.dumps(result.to_dict()))
    for kind in kinds:
        assert set(data["scores"][kind]) == {"rel", "gen", "loc"}


def test_chunks_roll_back_between_groups(tokenizer):
    model = tiny_model()
    made = []

    def make():
        made.append(WiseEditor(model, tokenizer, fast_config(max_steps=3)))
        return made[-1]

    result, editor = run_protocol(
        model,
        PromptFormat.create(tokenizer),
        RECORDS,
        make,
        method="WISE",
        mode="merge",
        dataset="toy",
        chunk=2,
        progress=False,
    )
    assert len(made) == 2 and editor.num_edits == 2
    assert not made[0]._attached and made[1]._attached


def test_slice_baseline_skips_records_without_probe():
    records = [RECORDS[0], EditRecord("q", "a"), RECORDS[1], RECORDS[2]]
    base = {"teacher_forced": [[1], [2], [3]], "generated": [[4], [5], [6]]}
    assert _slice_baseline(base, records, 1, 2) == {"teacher_forced": [[2]], "generated": [[5]]}


def test_empty_records_are_refused(tokenizer):
    with pytest.raises(ValueError, match="no records"):
        run_protocol(
            tiny_model(),
            PromptFormat.create(tokenizer),
            [],
            lambda: None,
            method="WISE",
            mode="merge",
            dataset="toy",
        )


def test_dataset_metrics_hallucination_and_temporal(tokenizer):
    from wise_edit.bench import dataset_metrics

    editor = WiseEditor(tiny_model(), tokenizer, fast_config(max_steps=20, lr=0.05))
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    records = [EditRecord(prompt, target, extra={"ood_rephrase": prompt})]
    perplexity = dataset_metrics("hallucination", editor, editor.format, records)["perplexity"]
    assert 1.0 <= perplexity["edited"] < perplexity["pre_edit"]
    ood = dataset_metrics("temporal", editor, editor.format, records)["ood_gen"]
    # OOD Gen on the prompt itself: success exactly when the per-token perplexity < 1/0.8
    assert ood["edited"] == float(perplexity["edited"] < 1 / 0.8) and ood["pre_edit"] == 0.0
    assert dataset_metrics("zsre", editor, editor.format, records) == {}


def test_kinds_share_one_decoding_per_prompt(tokenizer, monkeypatch):
    """Scoring every kind on one model state decodes each prompt once, and gives the
    scores each kind gets with decodings of its own."""
    model, fmt = tiny_model(), PromptFormat.create(tokenizer)
    alone = {k.name: score(k, model, fmt, RECORDS, None) for k in kinds_for(fmt)}
    decode = Decoder(model, fmt)
    base = locality_baseline(model, fmt, RECORDS, decode)
    shared = {k.name: score(k, model, fmt, RECORDS, None, decode) for k in kinds_for(fmt)}
    assert shared == alone
    prompts = {r.prompt for r in RECORDS} | {r.rephrase for r in RECORDS} | {r.loc for r in RECORDS}
    assert decode.decodings == len(prompts)
    assert base == locality_baseline(model, fmt, RECORDS)


def test_batched_decoding_scores_as_decoding_alone(tokenizer, monkeypatch):
    """The protocol with prompts decoded (and teacher-forced) in batches gives the scores
    of decoding each alone (`--decode-batch 1`), and does batch: fewer calls than prompts."""
    from wise_edit import metrics

    same_length = [EDITS[0][0], "Who designed Turku Town Hall?", "Who designed Lahti Old Hall?"]
    records = [
        EditRecord(
            p, t, rephrase=same_length[i - 1], loc=f"The bakery {i} sells bread.", loc_ans="x"
        )
        for i, (p, (_, t)) in enumerate(zip(same_length, EDITS))
    ]
    calls = []
    batched = metrics.greedy_continuations
    monkeypatch.setattr(
        metrics,
        "greedy_continuations",
        lambda m, f, p, n: calls.append(len(p)) or batched(m, f, p, n),
    )
    forced = []
    batched_forced = metrics.batch_target_predictions
    monkeypatch.setattr(
        metrics,
        "batch_target_predictions",
        lambda m, p, t: forced.append(len(p)) or batched_forced(m, p, t),
    )
    results = {}
    for batch in (1, 4):
        model = tiny_model()
        fmt = PromptFormat.create(tokenizer)

        def make():
            return WiseEditor(model, tokenizer, fast_config(max_steps=20, lr=0.05))  # noqa: B023

        calls.clear()
        forced.clear()
        result, _ = run_protocol(
            model,
            fmt,
            records,
            make,
            method="WISE",
            mode="merge",
            dataset="toy",
            progress=False,
            decode_batch=batch,
        )
        results[batch] = (result.scores, result.pre_edit, list(calls), list(forced))
    assert results[1][:2] == results[4][:2]
    assert set(results[1][2]) == {1} and max(results[4][2]) > 1
    assert results[1][3] == [] and max(results[4][3]) > 1
