"""benchmarks/stream.sh scores one long stream at its milestones: while the stream runs it
copies the checkpoint that holds exactly a milestone's edits and scores the copy beside
it with an eval-only `bench --resume`, then plots every finished point. Checked with a stand-in
`wise-edit` on PATH that writes checkpoints as a stream would, so no model runs."""

import json
import subprocess
from pathlib import Path

import pytest

from tests.benchmarks import with_stand_in

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "stream.sh"

# records each call; the stream writes a checkpoint per 100 edits (holding on each long
# enough to be seen), every run writes the results a finished bench leaves in its --out
FAKE_WISE_EDIT = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
while [[ $# -gt 0 ]]; do
    case $1 in --out) out=$2 ;; --edits) edits=$2 ;; esac
    shift
done
if [[ $out == *-defaults ]]; then
    for ((n = 100; n <= edits; n += 100)); do
        mkdir -p "$out/checkpoint/editor"
        python -c "import json, sys; print(json.dumps({'edit_log': [{'index': i} for i in \
range(int(sys.argv[1]))]}, indent=1))" "$n" > "$out/checkpoint/editor/editor_state.json"
        sleep 0.6
    done
else
    ls "$out/checkpoint/editor" >> "$CALLS"
    # scored while the stream still runs (it writes its results last)?
    [[ -f $OUT/counterfact-T300-defaults/results.json ]] ||
        echo "scored T = $edits during" >> "$CALLS"
fi
python - "$out" "$edits" <<'PY'
import json, sys
scores = {"rel": 1.0, "gen": 0.5, "loc": 0.9}
result = {
    "edits": int(sys.argv[2]),
    "scores": {"answer_em": scores, "teacher_forced": scores},
    "extra": {"latency": {"ratio": 1.01}, "saved_kb_per_edit": 76.0, "ram_kb_per_edit": 110.0},
    "seconds_per_edit": 2.5,
    "peak_memory_mb": 1300.0,
}
open(sys.argv[1] + "/results.json", "w").write(json.dumps(result))
PY
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return with_stand_in(
        tmp_path, "wise-edit", FAKE_WISE_EDIT, EDITS="300", MILESTONES="100 200", POLL="0.1"
    )


def stream(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT)], env={**env, **extra}, capture_output=True, text=True
    )


def test_each_milestone_is_the_streams_editor_scored_alone_then_plotted(env):
    done = stream(env)
    assert done.returncode == 0, done.stderr
    out = Path(env["OUT"])
    calls = Path(env["CALLS"]).read_text().splitlines()
    assert calls[0].startswith("bench --data counterfact --edits 300 --eval-sample 500")
    assert "--resume" in calls[0]
    for m in (100, 200):
        copy = out / f"counterfact-T{m}-of-300" / "checkpoint" / "editor"
        log = json.loads((copy / "editor_state.json").read_text())["edit_log"]
        assert len(log) == m  # the checkpoint as it was at the milestone
        scored = [c for c in calls if f"--out {out}/counterfact-T{m}-of-300" in c]
        assert len(scored) == 1 and f"--edits {m} " in scored[0] and "--resume" in scored[0]
    assert "scored T = 100 during" in calls  # not after the stream
    assert (out / "counterfact-stream.png").stat().st_size > 0
    assert "| 300 | 300 | 1.00 / 0.50 / 0.90 |" in done.stdout
    # RAM with the replay cache is the editing run's; a reloaded milestone has none
    assert "| 76.0 / 110.0 | 2.50 | 1300 |" in done.stdout
    assert "| 76.0 / – | 2.50 | – |" in done.stdout


def test_a_second_call_runs_nothing_already_finished(env):
    assert stream(env).returncode == 0
    Path(env["CALLS"]).unlink()
    again = stream(env)
    assert again.returncode == 0, again.stderr
    assert not Path(env["CALLS"]).exists()  # only the plot is made again
    assert "| 100 |" in again.stdout


def test_a_milestone_off_the_checkpoint_grid_is_refused_before_anything_runs(env):
    done = stream(env, MILESTONES="150")
    assert done.returncode == 2
    assert "not a multiple of EVERY=100" in done.stderr
    assert not Path(env["CALLS"]).exists()
