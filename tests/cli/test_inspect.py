"""`wise-edit inspect` on a tiny model's save: what it prints and writes are the edited
model's own answers and routing, and bad input is one line on stderr."""

import json

import pytest
from conftest import EDITS, fast_config, tiny_model, tiny_tokenizer

from wise_edit import WiseEditor
from wise_edit.answers import check_kinds, miss_summary
from wise_edit.cli import main
from wise_edit.evaluation import sample_indices
from wise_edit.metrics import ANSWER_NEW_TOKENS, answer_text, exact_answer, greedy_continuation

UNRELATED = "The capital of Japan is"


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """Three edits, one side memory each, saved as a bench run's checkpoint; the data
    file the save was edited with: record 0's paraphrase is edit 2's prompt and record 1's
    locality probe edit 0's (so each goes to another edit's memory), record 1's paraphrase
    is the unrelated prompt (it goes to no memory), record 2 has no paraphrase."""
    folder = tmp_path_factory.mktemp("inspect")
    editor = WiseEditor(
        tiny_model(),
        tiny_tokenizer(),
        fast_config(max_steps=60, lr=0.1, mode="retrieve", shard_size=1, shards_per_merge=1),
    )
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    editor.save_pretrained(folder / "run" / "checkpoint" / "editor")
    records = [
        {"prompt": p, "target": t, "rephrase": p, "loc": UNRELATED, "loc_ans": "Tokyo"}
        for p, t in EDITS[:3]
    ]
    records[0]["rephrase"] = EDITS[2][0]
    records[1]["loc"] = EDITS[0][0]
    records[1]["rephrase"] = UNRELATED
    del records[2]["rephrase"]
    data = folder / "edits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return editor, records, folder


def _answer(editor, prompt):
    ids = greedy_continuation(editor.model, editor.format, prompt, ANSWER_NEW_TOKENS)
    return answer_text(editor.format, ids)


def test_inspect_prints_and_writes_what_the_edited_model_answers(
    edited, model_dir, tmp_path, capsys
):
    editor, records, folder = edited
    out = tmp_path / "answers" / "answers.jsonl"
    argv = ["inspect", "--model", model_dir, "--device", "cpu", "--save", str(folder / "run")]
    argv += ["--data", str(folder / "edits.jsonl"), "--kinds", "prompt,rephrase,locality"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    assert [r["index"] for r in rows] == [0, 1, 2]  # --edits defaults to the save's 3
    assert [r["target"] for r in rows] == [t for _, t in EDITS[:3]]
    assert "rephrase" not in rows[2]  # record 2 has no paraphrase
    exact_prompts = 0
    for i, (row, record) in enumerate(zip(rows, records)):
        for kind, field in (("prompt", "prompt"), ("rephrase", "rephrase"), ("locality", "loc")):
            if field not in record:
                continue
            got, prompt = row[kind], record[field]
            answer = _answer(editor, prompt)  # the same model and edits, in this process
            assert got["text"] == prompt
            assert got["answer"] == answer
            assert got["memory"] == editor.routed([prompt])[0]
            assert got["own_memory"] == i  # one memory per edit, in order
            if kind != "locality":
                assert got["exact"] == bool(exact_answer(answer, record["target"]))
        exact_prompts += row["prompt"]["exact"]
        assert row["prompt"]["memory"] == i
        assert f"{i:4d} target={record['target']!r}" in printed
        assert f"answer={row['prompt']['answer']!r}" in printed
    assert exact_prompts >= 1  # the edits took: some edit prompt is answered exactly

    # record 0's paraphrase is edit 2's prompt: edit 2's memory takes it, a miss for edit 0
    misrouted = rows[0]["rephrase"]
    assert (misrouted["memory"], misrouted["own_memory"], misrouted["exact"]) == (2, 0, False)
    assert misrouted["a_target_of_the_memory"] == bool(
        exact_answer(misrouted["answer"], EDITS[2][1])
    )
    # a locality probe is right when its answer is the unedited model's: the unrelated
    # prompt reaches no memory and keeps it, edit 0's prompt is answered by its memory
    for row, record in zip(rows, records):
        ids = greedy_continuation(editor.model, editor.format, record["loc"], ANSWER_NEW_TOKENS)
        with editor.disabled():
            before = greedy_continuation(
                editor.model, editor.format, record["loc"], ANSWER_NEW_TOKENS
            )
        assert row["locality"]["exact"] == (ids == before)
    assert [row["locality"]["memory"] for row in rows] == [-1, 0, -1]
    assert [row["locality"]["exact"] for row in rows] == [True, False, True]
    assert "locality: exact 2, miss: routed to another memory 1" in printed
    assert (rows[1]["rephrase"]["memory"], rows[1]["rephrase"]["exact"]) == (-1, False)
    rephrase_line = printed.split("\nrephrase: ")[1].split("\n")[0]
    assert "miss: routed to another memory 1" in rephrase_line
    assert "miss: routed to no memory 1" in rephrase_line
    wrong = 3 - exact_prompts
    prompt_line = f"prompt: exact {exact_prompts}"
    if wrong:
        prompt_line += f", miss: own memory, wrong answer {wrong}"
    assert prompt_line in printed.splitlines()
    assert f"wrote {out}" in printed


def test_inspect_asks_the_bench_sample_and_the_kinds_chosen(edited, model_dir, capsys, tmp_path):
    editor, _, folder = edited
    save = folder / "run" / "checkpoint" / "editor"  # the save itself, not the run
    out = tmp_path / "a.jsonl"
    argv = ["inspect", "--model", model_dir, "--device", "cpu", "--save", str(save)]
    argv += ["--data", str(folder / "edits.jsonl"), "--edits", "3", "--sample", "1"]
    assert main([*argv, "--kinds", "prompt", "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["index"] == sample_indices(3, 1)[0]
    assert set(row) == {"index", "target", "prompt"}
    assert row["prompt"]["answer"] == _answer(editor, EDITS[row["index"]][0])
    assert "rephrase:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--save", "{tmp}/missing"], "--save {tmp}/missing: no such folder"),
        (["--save", "{tmp}"], "no editor save in it"),
        (["--save", "{tmp}", "--kinds", "prompt,answer"], "kinds answer: choose from prompt"),
        (["--save", "{tmp}", "--kinds", ","], "kinds (none): choose from"),
    ],
)
def test_bad_input_is_one_line_on_stderr(extra, message, tmp_path, capsys):
    argv = ["inspect", "--model", "never-loaded"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("wise-edit: error: ")
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1


def test_inspect_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: wise-edit inspect")
    assert "--kinds" in out and "routed to no memory" in out


def test_miss_summary_counts_nothing_for_nothing():
    assert miss_summary([]) == ""
    assert check_kinds(["locality", "prompt"]) == ("locality", "prompt")
