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
