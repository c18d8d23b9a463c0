"""The command line on a tiny local model folder: help, edit -> save -> generate, bench."""

import json

import pytest
from conftest import EDITS, tiny_model, tiny_tokenizer

from wise_edit.cli import build_parser, main

FAST = ["--set", "max_steps=3", "--set", "prefix_count=1", "--set", "prefix_lengths=[2]"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("command", ["demo", "bench", "edit", "generate"])
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
    assert (out / "wise_memories.safetensors").is_file()
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
    assert EDITS[0][0] in printed and "memory" in printed


def test_errors_are_reported_not_raised(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert (
        main(["edit", "--model", model_dir, "--edits", str(bad), "--out", str(tmp_path / "o")]) == 2
    )
    assert "line 1" in capsys.readouterr().err


def test_bench_writes_results(model_dir, tmp_path):
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
            *FAST,
        ]
    )
    result = json.loads((out / "results.json").read_text())
    for key in (
        "method",
        "mode",
        "edits",
        "teacher_forced",
        "generated",
        "pre_edit",
        "seconds_per_edit",
        "peak_memory_mb",
    ):
        assert key in result
    assert result["edits"] == 2 and result["extra"]["latency"]["ratio"] > 0
    assert (out / "results.md").is_file() and (out / "routing.png").stat().st_size > 1000


def test_set_parses_json_values():
    args = build_parser().parse_args(["bench", "--set", "mask_ratio=0.5", "--set", "mode=retrieve"])
    from wise_edit.cli import _config

    config = _config(tiny_model(), args)
    assert config.mask_ratio == 0.5 and config.mode == "retrieve"
