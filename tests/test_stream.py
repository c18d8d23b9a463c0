"""Fault tests: `wise-edit edit` killed with SIGKILL in the middle of an edit stream.
Whatever the moment, the folder holds a complete save (or none yet), and `--resume` ends
exactly where an uninterrupted run ends. Trials are bounded in time."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from safetensors.torch import load_file

from wise_edit.core.persistence import STATE_FILE, TENSOR_FILE, read_save

RECORDS = [(f"Who founded the town of Vel{i}?", f"Person {i}") for i in range(10)]
SETTINGS = ["--set", "max_steps=8", "--set", "prefix_count=1", "--set", "prefix_lengths=[2]"]
SETTINGS += ["--mode", "retrieve", "--set", "shard_size=2", "--set", "replay=true"]
BUDGET_S = 90  # wall time for the kill trials of one test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    tiny_model().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    edits = root / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in RECORDS))
    reference = root / "reference"
    assert _edit(root, reference).wait(timeout=300) == 0
    return root, reference


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _edit(root: Path, out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "wise_edit.cli", "edit", "--model", str(root / "model")]
    argv += ["--edits", str(root / "edits.jsonl"), "--out", str(out), "--data-dir", str(root)]
    argv += ["--checkpoint-every", "1", *SETTINGS, *extra]
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _same_result(a: Path, b: Path) -> None:
    """Equal edit logs (but for timings) and bit-equal tensors."""
    logs = [json.loads((f / STATE_FILE).read_text())["edit_log"] for f in (a, b)]
    for log in logs:
        for entry in log:
            entry.pop("seconds")
    assert logs[0] == logs[1]
    ta, tb = load_file(str(a / TENSOR_FILE)), load_file(str(b / TENSOR_FILE))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_stream_killed_anywhere_resumes_exactly(setup):
    root, reference = setup
    rng = random.Random(0)
    started, outcomes = time.monotonic(), []
    trial = 0
    while time.monotonic() - started < BUDGET_S and trial < 4:
        out = root / f"killed-{trial}"
        proc = _edit(root, out)
        while not out.exists() and proc.poll() is None:  # the first checkpoint is written
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = read_save(out)  # a complete save, whatever the moment of the kill
        outcomes.append("finished" if finished else f"killed after {len(saved.state['edit_log'])}")
        resumed = _edit(root, out, "--resume")
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
        _same_result(reference, out)
        assert not list(root.glob(f".killed-{trial}.tmp-*"))  # the resume cleaned up
        trial += 1
    print("stream kill trials:", outcomes)
    assert any(o.startswith("killed") for o in outcomes)


def _lines(*records: str) -> list:
    from wise_edit.data import EditRecord, JsonlLine

    return [JsonlLine(i, f"h-{r}", EditRecord(r, "t")) for i, r in enumerate(records, start=1)]


def _log(file: str, *records: str) -> list[dict]:
    return [
        {"meta": {"file": file, "line": i, "sha256": f"h-{r}"}}
        for i, r in enumerate(records, start=1)
    ]


def test_a_plan_matches_records_by_content():
    from wise_edit.stream import StreamError, plan_stream

    plan = plan_stream(_log("a.jsonl", "A", "B"), Path("b.jsonl"), _lines("A", "B", "C"))
    assert [line.number for line in plan.todo] == [3] and plan.skipped_lines == [1, 2]
    assert "line(s) 1-2, applied from a.jsonl" in plan.describe(Path("b.jsonl"), Path("out"))
    # a record given twice is applied twice; a line put in front shifts nothing
    plan = plan_stream(_log("a.jsonl", "A"), Path("a.jsonl"), _lines("X", "A", "A"))
    assert [line.number for line in plan.todo] == [1, 3]
    with pytest.raises(StreamError, match=r"line\(s\) 2 changed"):
        plan_stream(_log("a.jsonl", "A", "B"), Path("a.jsonl"), _lines("A", "B2"))
