"""benchmarks/tables34.sh carries an unfinished run's checkpoint from one session to the
next through the repository: `carry` copies it into KEEP, and a later call resumes from
that copy where OUT has no checkpoint of the run or an older one, and drops it once the
run is kept. Checked with
a stand-in `python` on PATH that records its arguments, so no model runs."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.benchmarks import with_stand_in

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tables34.sh"
RUN = "temporal-T3-raw-ft-l"

# records each call; `bench` writes the results a finished run leaves in its --out
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [[ $3 == bench ]]; then
    while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && out=$2; shift; done
    ls "$out/checkpoint/editor" >> "$CALLS" 2>/dev/null || true
    mkdir -p "$out"
    echo '{}' > "$out/results.json"
    echo done > "$out/results.md"
fi
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return with_stand_in(
        tmp_path,
        "python",
        FAKE_PYTHON,
        KEEP=str(tmp_path / "keep"),
        SETS="temporal:3",
        METHODS="ft-l",
    )


def tables34(env: dict[str, str], *args: str, **extra: str) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**env, **extra},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def checkpoint(root: Path, edits: int = 0) -> Path:
    editor = root / RUN / "checkpoint" / "editor"
    editor.mkdir(parents=True)
    log = [{"index": i, "prompt": f'say "index": {i}'} for i in range(edits)]
    (editor / "editor_state.json").write_text(json.dumps({"edit_log": log}, indent=2))
    (editor.parent / ".editor.lock").write_text("")
    return editor.parent


def test_carry_copies_an_unfinished_checkpoint_without_its_lock(env):
    checkpoint(Path(env["OUT"]))
    printed = tables34(env, "carry")
    carried = Path(env["KEEP"]) / RUN / "checkpoint"
    assert "carried:" in printed
    assert (carried / "editor" / "editor_state.json").is_file()
    assert not (carried / ".editor.lock").exists()
    assert not Path(env["CALLS"]).exists()  # nothing ran


def test_carry_skips_a_checkpoint_over_the_size_limit(env):
    checkpoint(Path(env["OUT"]))
    printed = tables34(env, "carry", CARRY_MB="0")
    assert "not carried:" in printed
    assert not (Path(env["KEEP"]) / RUN).exists()


def test_carry_skips_a_finished_run(env):
    checkpoint(Path(env["OUT"]))
    (Path(env["OUT"]) / RUN / "results.json").write_text("{}")
    assert tables34(env, "carry") == ""
    assert not (Path(env["KEEP"]) / RUN).exists()


def test_a_carried_checkpoint_is_resumed_and_dropped_once_kept(env):
    carried = checkpoint(Path(env["KEEP"]))
    printed = tables34(env)
    calls = Path(env["CALLS"]).read_text().splitlines()
    bench = next(line for line in calls if " bench " in line)
    assert "--resume" in bench and "--pre-edit-from" not in bench
    assert calls[calls.index(bench) + 1] == "editor_state.json"  # restored before the run
    assert "resuming from the carried" in printed
    assert (Path(env["KEEP"]) / RUN / "results.json").is_file()
    assert not carried.exists()


def test_hallucination_edits_are_capped_at_20_steps_but_ft_ewcs(env):
    tables34(env, SETS="hallucination:3 temporal:3", METHODS="wise grace ft-ewc")
    calls = Path(env["CALLS"]).read_text().splitlines()
    capped = {
        line.split("--out ")[1].split()[0].rsplit("/", 1)[1]: "--set max_steps=20" in line
        for line in calls
        if " bench " in line
    }
    assert capped == {
        "hallucination-T3-raw-wise": True,
        "hallucination-T3-raw-grace": True,
        "hallucination-T3-raw-ft-ewc": False,  # run before the cap, with its own 100 steps
        "temporal-T3-raw-wise": False,
        "temporal-T3-raw-grace": False,
        "temporal-T3-raw-ft-ewc": False,
    }


@pytest.mark.parametrize(("in_out", "carried", "resumed"), [(1, 2, 2), (3, 2, 3), (2, 2, 2)])
def test_the_further_checkpoint_is_resumed(env, in_out, carried, resumed):
    """A session whose OUT kept an older checkpoint of the run resumes from the one
    another session carried past it, and never goes back from its own to an older one."""
    checkpoint(Path(env["OUT"]), edits=in_out)
    checkpoint(Path(env["KEEP"]), edits=carried)
    printed = tables34(env)
    state = Path(env["OUT"]) / RUN / "checkpoint" / "editor" / "editor_state.json"
    assert len(json.loads(state.read_text())["edit_log"]) == resumed
    assert ("resuming from the carried" in printed) == (carried > in_out)
    assert "--resume" in Path(env["CALLS"]).read_text()
