"""The command line on a tiny local model folder: help, edit -> save -> generate, bench."""

import json
from pathlib import Path

import pytest
from conftest import EDITS, tiny_model

from wise_edit.cli import build_parser, main

FAST = ["--set", "max_steps=3", "--set", "prefix_count=1", "--set", "prefix_lengths=[2]"]


@pytest.mark.parametrize(
    "command", ["demo", "bench", "edit", "retract", "generate", "compare", "train-mend"]
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: wise-edit " + command in capsys.readouterr().out


def test_edit_then_generate(model_dir, tmp_path, capsys):
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in EDITS[:2]))
    out = tmp_path / "saved"
    assert (
        main(
            [
                "edit",
                "--model",
                model_dir,
                "--edits",
                str(edits),
                "--out",
                str(out),
                "--data-dir",
                str(tmp_path),
                *FAST,
            ]
        )
        == 0
    )
    assert "applied 2 edits" in capsys.readouterr().out
    assert (out / "editor_model.safetensors").is_file()
    assert (
        main(
            [
                "generate",
                "--model",
                model_dir,
                "--edits",
                str(out),
                "--max-new-tokens",
                "2",
                EDITS[0][0],
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert EDITS[0][0] in printed and ("WISE: side memory" in printed or "[unedited]" in printed)


def test_errors_are_reported_not_raised(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert (
        main(["edit", "--model", model_dir, "--edits", str(bad), "--out", str(tmp_path / "o")]) == 2
    )
    assert "line 1" in capsys.readouterr().err


def _tiny_zsre(tmp_path):
    data = tmp_path / "data" / "zsre"
    data.mkdir(parents=True)
    records = [
        {
            "src": p,
            "alt": t,
            "rephrase": p,
            "loc": "nq question: who is it",
            "loc_ans": "nobody",
            "subject": "s",
            "pred": "x",
            "answers": ["x"],
            "cond": "",
        }
        for p, t in EDITS[:2]
    ]
    (data / "zsre_edit.json").write_text(json.dumps(records))
    (data / "zsre_loc_1k.json").write_text(json.dumps(records))
    return tmp_path / "data"


def test_bench_writes_results(model_dir, tmp_path):
    _tiny_zsre(tmp_path)
    out = tmp_path / "run"
    main(
        [
            "bench",
            "--model",
            model_dir,
            "--data-dir",
            str(tmp_path / "data"),
            "--edits",
            "2",
            "--out",
            str(out),
            "--latency-repeats",
            "1",
            "--decode-batch",
            "4",
            *FAST,
        ]
    )
    result = json.loads((out / "results.json").read_text())
    assert result["extra"]["decode_batch"] == 4
    for key in (
        "method",
        "mode",
        "edits",
        "scores",
        "prompt_format",
        "pre_edit",
        "seconds_per_edit",
        "peak_memory_mb",
    ):
        assert key in result
    assert result["edits"] == 2 and result["extra"]["latency"]["ratio"] > 0
    assert result["prompt_format"] == "raw"  # the tiny tokenizer has no chat template
    assert set(result["scores"]) == {"answer_em", "teacher_forced", "prefix_em"}
    assert (out / "results.md").is_file() and (out / "routing.png").stat().st_size > 1000


def test_set_parses_json_values_under_new_and_old_names():
    from wise_edit.cli import _config

    for names in (("mask_ratio", "mode"), ("shards.mask_ratio", "memory.mode")):
        argv = ["bench", "--set", f"{names[0]}=0.5", "--set", f"{names[1]}=retrieve"]
        config = _config(tiny_model(), build_parser().parse_args(argv))
        assert config.shards.mask_ratio == 0.5 and config.memory.mode == "retrieve"


BASELINE_FAST = {
    "ft-l": ["--set", "max_steps=3"],
    "ft-ewc": ["--set", "max_steps=3", "--set", "replay=1"],
    "grace": ["--set", "max_steps=3"],
    "defer": ["--set", "max_steps=3"],
    "mend": ["--set", "network=identity", "--set", "lr=10"],
}


def test_bench_runs_every_baseline_and_compare_tabulates_them(model_dir, tmp_path, capsys):
    data_dir = _tiny_zsre(tmp_path)
    runs = []
    for method, fast in BASELINE_FAST.items():
        out = tmp_path / method
        argv = ["bench", "--model", model_dir, "--data-dir", str(data_dir), "--edits", "2"]
        argv += ["--method", method, "--out", str(out), "--latency-repeats", "1", *fast]
        assert main(argv) == 0
        result = json.loads((out / "results.json").read_text())
        assert result["method"] == method.upper() and result["mode"] == ""
        assert result["scores"]["teacher_forced"]["rel"] is not None
        assert result["scores"]["answer_em"]["loc"] is not None
        assert result["extra"]["steps_per_edit"] >= 1
        assert result["extra"]["command"].startswith("wise-edit bench")
        assert ("routing" in result["extra"]) == (method in ("grace", "defer"))
        runs.append(str(out))
    capsys.readouterr()
    table_file = tmp_path / "table.md"
    assert main(["compare", *runs, "--out", str(table_file)]) == 0
    table = table_file.read_text()
    assert all(f"| {m.upper()} | zsre | raw | 2 |" in table for m in BASELINE_FAST)
    assert "| s/edit | KB/edit saved / RAM | peak MB |" in table
    # a WISE run without its router (the paper's Table 7) is named so
    ablation = json.loads((Path(runs[0]) / "results.json").read_text())
    ablation.update(method="WISE", mode="retrieve", peak_memory_mb=1234.0)
    ablation["extra"]["config"] = {"routing": {"gate": False}}
    (tmp_path / "ablation.json").write_text(json.dumps(ablation))
    assert main(["compare", str(tmp_path / "ablation.json")]) == 0
    assert "| WISE-retrieve w.o. router | zsre | raw | 2 |" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "nowhere")]) == 2


def test_train_mend_then_bench_with_the_trained_network(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path / "cache"))
    data_dir = _tiny_zsre(tmp_path)
    train = ["train-mend", "--model", model_dir, "--data-dir", str(data_dir), "--steps", "2"]
    train += ["--train", "holdout=0", "--set", "rank=4"]
    assert main(train) == 0
    out = capsys.readouterr().out
    assert "trained in" in out and str(tmp_path / "cache" / "mend") in out
    assert main(train) == 0  # cached: not trained again
    assert "--force retrains" in capsys.readouterr().out
    run = tmp_path / "run"
    argv = ["bench", "--model", model_dir, "--data-dir", str(data_dir), "--edits", "2"]
    argv += ["--method", "mend", "--set", "rank=4", "--out", str(run), "--latency-repeats", "1"]
    assert main(argv) == 0
    assert json.loads((run / "results.json").read_text())["method"] == "MEND"
    capsys.readouterr()
    argv[argv.index("rank=4")] = "rank=8"  # no network trained for this shape
    assert main(argv) == 2
    assert "wise-edit train-mend" in capsys.readouterr().err


def test_mode_is_refused_for_a_baseline(model_dir, tmp_path):
    from wise_edit.cli import _config
    from wise_edit.methods import editor_class

    args = build_parser().parse_args(["bench", "--method", "grace", "--mode", "retrieve"])
    with pytest.raises(SystemExit, match="--mode applies to WISE"):
        _config(tiny_model(), args, editor_class(args.method))
    args = build_parser().parse_args(["bench", "--method", "grace", "--set", "epsilon_init=3"])
    assert _config(tiny_model(), args, editor_class("grace")).epsilon_init == 3


def test_edit_and_generate_with_a_baseline(model_dir, tmp_path, capsys):
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in EDITS[:2]))
    out = tmp_path / "saved"
    argv = ["edit", "--model", model_dir, "--edits", str(edits), "--out", str(out)]
    assert (
        main([*argv, "--data-dir", str(tmp_path), "--method", "grace", "--set", "max_steps=3"]) == 0
    )
    assert "applied 2 edits (GRACE" in capsys.readouterr().out
    assert (out / "editor_model.safetensors").is_file()
    assert main(["generate", "--model", model_dir, "--edits", str(out), EDITS[0][0]]) == 0
    assert "GRACE: codebook entry 0" in capsys.readouterr().out


def test_bench_on_a_users_jsonl(model_dir, tmp_path):
    edits = tmp_path / "mine.jsonl"
    rows = [
        {
            "prompt": p,
            "target": t,
            "rephrase": p.lower(),
            "loc": "The bakery sells",
            "loc_ans": "bread",
        }
        for p, t in EDITS[:3]
    ]
    edits.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    argv = ["bench", "--model", model_dir, "--data", str(edits), "--edits", "2"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out), "--latency-repeats", "1", *FAST]
    assert main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "mine" and result["edits"] == 2
    routed = result["extra"]["routing"]["share_routed_to_side_memory"]
    # the record after the two edited ones probes the router in the edits' own form
    assert set(routed) == {"edit prompts", "paraphrases", "unrelated", "same-form unrelated"}
    own = result["extra"]["routing"]["share_routed_to_own_memory"]
    assert set(own) == {"edit prompts", "paraphrases"}
    report = (out / "results.md").read_text()
    assert "answer EM Rel" in report and "routed to the memory holding the edit" in report


def test_compare_reads_runs_written_before_answer_em(tmp_path):
    from wise_edit.bench import comparison_table

    old = {
        "method": "WISE",
        "mode": "merge",
        "edits": 10,
        "dataset": "zsre",
        "teacher_forced": {"rel": 0.94, "gen": 0.81, "loc": 1.0},
        "generated": {"rel": 0.7, "gen": 0.6, "loc": 1.0},
        "seconds_per_edit": 7.93,
    }
    (tmp_path / "results.json").write_text(json.dumps(old))
    row = comparison_table([str(tmp_path)]).splitlines()[-1]
    # answer EM unknown, gen. Loc kept, TF, then the old generated EM as prefix EM
    assert row == (
        "| WISE-merge | zsre | raw | 10 | – | – | 1.00 | 0.94 | 0.81 | 1.00 | 0.70 | 0.60 "
        "| – | – | 7.93 | – / – | – |"
    )


def test_compare_adds_the_sets_own_metric_where_a_run_has_one(tmp_path):
    from wise_edit.bench import comparison_table

    base = {"method": "GRACE", "mode": "", "edits": 3, "scores": {}, "seconds_per_edit": 1.0}
    runs = {
        "halluc": {**base, "dataset": "hallucination", "extra": {
            "perplexity": {"edited": 3.125, "pre_edit": 27.4}}},
        "temporal": {**base, "dataset": "temporal", "extra": {
            "ood_gen": {"edited": 0.5, "pre_edit": 0.25}}},
        "zsre": {**base, "dataset": "zsre", "extra": {
            "saved_kb_per_edit": 4.2, "ram_kb_per_edit": 9.0}},
    }  # fmt: skip
    for name, data in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    lines = comparison_table([str(tmp_path / n) for n in runs]).splitlines()
    header = "| PPL of the edits ↓ (pre-edit) | OOD Gen (pre-edit) | s/edit | KB/edit saved / RAM "
    assert lines[0].endswith(header + "| peak MB |")
    assert lines[2].endswith("| 3.12 (27.40) | – | 1.00 | – / – | – |")  # hallucination first
    assert lines[3].endswith("| – | 0.50 (0.25) | 1.00 | – / – | – |")
    assert lines[4].endswith("| – | – | 1.00 | 4.2 / 9.0 | – |")
    assert "PPL" not in comparison_table([str(tmp_path / "zsre")])


def test_serve_request_limits_are_flags(monkeypatch, tmp_path):
    import wise_edit.serve.run as run

    seen = {}
    monkeypatch.setattr(run, "serve", lambda settings: seen.setdefault("s", settings))
    args = build_parser().parse_args(
        ["serve", "--state", str(tmp_path), "--max-prompt-chars", "12", "--max-tokens", "7"]
    )
    assert args.func(args) == 0
    limits = seen["s"].limits
    assert (limits.max_prompt_chars, limits.max_tokens) == (12, 7)
    assert limits.max_body_bytes == 256 * 1024  # untouched flags keep their defaults


@pytest.mark.parametrize("edits", ["-2", "0"])
def test_bench_refuses_a_count_below_one(edits, model_dir, tmp_path, capsys):
    argv = ["bench", "--model", model_dir, "--data-dir", str(tmp_path), "--edits", edits]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("wise-edit:")]
    assert f"--edits must be >= 1, got {edits}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "'method' is missing"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"scores": "x"}', "'method' is missing"),
        (
            '{"method": "WISE", "dataset": "zsre", "edits": 2, "seconds_per_edit": 1, '
            '"scores": "x"}',
            "'scores' is not an object",
        ),
        ("[" * 100_000, "unreadable JSON"),
    ],
)
def test_compare_names_a_file_that_is_not_a_bench_result(content, message, tmp_path, capsys):
    (tmp_path / "results.json").write_text(content)
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("wise-edit:")]
    assert "results.json: not a `wise-edit bench` results.json" in line and message in line


def test_edit_in_batches_and_memit_mass_in_one_update(model_dir, tmp_path):
    from wise_edit.core.persistence import read_save

    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in EDITS[:3]))
    base = ["edit", "--model", model_dir, "--edits", str(edits), "--data-dir", str(tmp_path)]
    assert main([*base, "--out", str(tmp_path / "wise"), "--batch", "2", *FAST]) == 0
    log = read_save(tmp_path / "wise").state["edit_log"]
    assert [e.get("batch") for e in log] == [2, 2, None]
    stats = ["--set", "stats_corpus=neutral", "--set", f"stats_dir={tmp_path / 'stats'}"]
    locate = ["--set", "layer=2", "--set", "span=2", "--set", "max_steps=2", *stats]
    assert main([*base, "--out", str(tmp_path / "mass"), "--method", "memit-mass", *locate]) == 0
    log = read_save(tmp_path / "mass").state["edit_log"]
    assert [e["batch"] for e in log] == [3, 3, 3]  # the method's own: the whole stream


def test_bench_in_batches_says_so(model_dir, tmp_path):
    edits = tmp_path / "mine.jsonl"
    loc = {"loc": "The bakery sells", "loc_ans": "bread"}
    edits.write_text("\n".join(json.dumps({"prompt": p, "target": t, **loc}) for p, t in EDITS[:3]))
    out = tmp_path / "run"
    argv = ["bench", "--model", model_dir, "--data", str(edits), "--edits", "3"]
    argv += ["--data-dir", str(tmp_path), "--out", str(out), "--latency-repeats", "1", *FAST]
    assert main([*argv, "--batch", "0"]) == 2
    assert main([*argv, "--batch", "2"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["extra"]["batch"] == 2
    assert "edits made 2 at a time" in (out / "results.md").read_text()


def _edit_save(model_dir, tmp_path, count, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in EDITS[:count]))
    out = tmp_path / "saved"
    argv = ["edit", "--model", model_dir, "--edits", str(edits), "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path), *extra]) == 0
    return out


def _loaded(model_dir, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wise_edit import load_editor

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return load_editor(model, AutoTokenizer.from_pretrained(model_dir), out)


def test_retract_takes_edits_back_from_a_save_and_keeps_the_rest(model_dir, tmp_path, capsys):
    out = _edit_save(model_dir, tmp_path, 3, *FAST)
    before = _loaded(model_dir, out)
    routed = before.routed([p for p, _ in EDITS[:3]])
    before.detach()
    argv = ["retract", "--model", model_dir, "--edits", str(out), "--data-dir", str(tmp_path)]
    assert main([*argv, "1"]) == 0
    assert "retracted edit 1" in capsys.readouterr().out
    after = _loaded(model_dir, out)
    assert after.live_edits() == [0, 2]
    assert after.edit_log[1]["retracted"]["retrained_edits"] >= 0
    now = after.routed([p for p, _ in EDITS[:3]])
    assert now[1] == -1  # edit 1's prompt reaches no memory: the unedited model answers
    assert [now[0], now[2]] == [routed[0], routed[2]]  # the others hold where they were
    after.detach()


def test_retract_refuses_bad_ids_and_shared_weight_methods_leaving_the_save(
    model_dir, tmp_path, capsys
):
    out = _edit_save(model_dir, tmp_path, 2, *FAST)
    argv = ["retract", "--model", model_dir, "--edits", str(out), "--data-dir", str(tmp_path)]

    def refused(*ids: str) -> str:
        saved = (out / "editor_state.json").read_text()
        capsys.readouterr()
        assert main([*argv, *ids]) == 2
        assert (out / "editor_state.json").read_text() == saved  # nothing half-applied
        return capsys.readouterr().err

    assert "not an applied edit" in refused("0", "5") and "[5]" in refused("0", "5")
    assert "given twice" in refused("0", "0")
    assert main([*argv, "0"]) == 0
    assert "1 already retracted): [0]" in refused("0")
    ft = _edit_save(model_dir, tmp_path / "ft", 2, "--method", "ft-l", "--set", "max_steps=2")
    capsys.readouterr()
    assert main(["retract", "--model", model_dir, "--edits", str(ft), "0"]) == 2
    assert "FT-L edits, which cannot be retracted" in capsys.readouterr().err
