"""Long benchmark runs that survive: `wise-edit bench --checkpoint-every N` killed with
SIGKILL midway and continued with `--resume` gives the uninterrupted run's scores; a
fixed random evaluation sample."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import EDITS, as_format_2, flat_config, tiny_model, tiny_tokenizer

from wise_edit.evaluation import sample_indices

FAST = ["--set", "max_steps=6", "--set", "prefix_count=1", "--set", "prefix_lengths=[2]"]
RECORDS = [(f"Who founded the town of Vel{i}?", f"Person {i}") for i in range(8)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tiny_model().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    data = root / "data" / "zsre"
    data.mkdir(parents=True)
    rows = [
        {
            "src": p,
            "alt": t,
            "rephrase": p.replace("Who", "Which person"),
            "loc": "nq: who",
            "loc_ans": "nobody",
            "subject": p.rstrip("?").split()[-1],
            "pred": "x",
            "answers": ["x"],
        }
        for p, t in RECORDS + EDITS
    ]
    (data / "zsre_edit.json").write_text(json.dumps(rows))
    (data / "zsre_loc_1k.json").write_text(json.dumps(rows[-4:]))
    return root


def _bench(root, out, *extra):
    argv = [sys.executable, "-m", "wise_edit.cli", "bench", "--model", str(root / "model")]
    argv += ["--data-dir", str(root / "data"), "--edits", str(len(RECORDS)), "--out", str(out)]
    argv += ["--latency-repeats", "1", "--mode", "retrieve", "--set", "shard_size=2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*argv, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _scores(out):
    data = json.loads((out / "results.json").read_text())
    return data["scores"], data["pre_edit"], data["extra"]["memories"]


def test_a_killed_bench_resumes_to_the_uninterrupted_result(setup):
    root = setup
    straight = _bench(root, root / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()
    out = root / "killed"
    proc = _bench(root, out, "--checkpoint-every", "1")
    saved = out / "checkpoint" / "editor" / "editor_state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # the checkpoint folder is swapped whole on each save, so it may be gone
            if len(json.loads(saved.read_text())["edit_log"]) >= 3:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(saved.read_text())["edit_log"])
    assert 3 <= done < len(RECORDS) and not (out / "results.json").exists()
    again = _bench(root, out, "--checkpoint-every", "1")  # without --resume: refused
    assert again.wait(timeout=600) == 2 and b"--resume continues it" in again.stderr.read()
    resumed = _bench(root, out, "--resume", "--checkpoint-every", "1")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    assert _scores(out) == _scores(root / "straight")


def test_the_evaluation_sample_is_fixed_and_sorted():
    picked = sample_indices(1000, 500)
    assert picked == sample_indices(1000, 500) and picked == sorted(set(picked))
    assert len(picked) == 500 and picked[-1] < 1000
    assert sample_indices(10, None) == list(range(10)) == sample_indices(10, 50)
    with pytest.raises(ValueError, match="eval sample"):
        sample_indices(10, 0)


def test_bench_scores_only_the_sample(setup, tmp_path):
    from wise_edit.cli import main

    out = tmp_path / "sampled"
    argv = ["bench", "--model", str(setup / "model"), "--data-dir", str(setup / "data")]
    argv += ["--edits", "6", "--eval-sample", "2", "--out", str(out), "--latency-repeats", "1"]
    assert main([*argv, *FAST]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["extra"]["eval_sample"] == {"records": 2, "seed": 0} and data["edits"] == 6
    assert "sample of 2 of the 6 edits" in (out / "results.md").read_text()


def test_pre_edit_scores_are_taken_from_another_methods_run(setup, tmp_path, monkeypatch):
    """The unedited model's scores do not depend on the method: a second method's run
    reads them from the first's checkpoint instead of computing them, and a run with
    another evaluation sample is refused."""
    from wise_edit import evaluation
    from wise_edit.cli import main

    argv = ["bench", "--model", str(setup / "model"), "--data-dir", str(setup / "data")]
    argv += ["--edits", "4", "--latency-repeats", "1", "--set", "max_steps=6"]
    first = tmp_path / "wise"
    assert main([*argv, *FAST[2:], "--out", str(first), "--checkpoint-every", "2"]) == 0

    def computed(*args, **kwargs):
        raise AssertionError("the pre-edit scores were computed again")

    monkeypatch.setattr(evaluation.PreEdit, "compute", classmethod(computed))
    grace = ["--method", "grace", "--pre-edit-from", str(first)]
    assert main([*argv, *grace, "--out", str(tmp_path / "grace")]) == 0
    pre = [
        json.loads((out / "results.json").read_text())["pre_edit"]
        for out in (first, tmp_path / "grace")
    ]
    assert pre[0] == pre[1]
    other = ["--eval-sample", "2", "--out", str(tmp_path / "sampled")]
    assert main([*argv, *grace, *other]) == 2


def test_a_resume_keeps_the_runs_config_and_refuses_a_setting_given_otherwise(
    setup, tmp_path, capsys
):
    """A checkpointed run continues as it was configured: a default added or changed
    since it started (here: side steps, removed from its saved config as an older save
    lacks them) does not stop it, and it keeps training as it did; a setting given again
    with another value is refused, naming it; one not given again (the mode) is the
    run's, in what the result reports as well."""
    from wise_edit.cli import main

    out = tmp_path / "run"
    argv = ["bench", "--model", str(setup / "model"), "--data-dir", str(setup / "data")]
    argv += ["--edits", "4", "--latency-repeats", "1", *FAST, "--out", str(out)]
    started = ["--mode", "retrieve", "--set", "shard_size=2", "--set", "memory.rank=0"]
    started += ["--checkpoint-every", "2"]  # dense memories: format 2 had no others
    assert main([*argv, *started]) == 0
    as_format_2(out / "checkpoint" / "editor", drop=("side_steps",))
    protocol = out / "checkpoint" / "protocol.json"
    data = json.loads(protocol.read_text())
    data["settings"]["config"] = flat_config(data["settings"]["config"])
    del data["settings"]["config"]["side_steps"]
    protocol.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([*argv, "--resume", "--set", "max_steps=5"]) == 2
    assert "max_steps (save: 6, given: 5)" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["extra"]["config"]["side_steps"] == 0
    assert result["mode"] == "retrieve"
    assert result["extra"]["config"]["memory"]["mode"] == "retrieve"
