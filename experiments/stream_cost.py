# Experiment: Does an edit get dearer as the stream grows (forwards and seconds per edit along saved
#   edit logs)?
# Decided: Not in Retrieve (forwards per edit flat from edit 1 to 1000); in Merge they climb from 16
#   to 26, one more reason long streams use Retrieve; nothing changed
# Ran at: ea6c67a, as benchmarks/stream_cost.py. Output: docs/notebook/results/stream-cost/
"""Does an edit get dearer as the stream grows? Steps (forwards) and seconds per edit
against the edit's position, read from saved editors' edit logs (no model is loaded):

    python benchmarks/stream_cost.py runs/zsre1000-defaults/checkpoint/editor \\
        runs/cf1000-radius/checkpoint/editor --window 50 --plot docs/stream-cost.png

Prints, per block of ``--window`` edits, the mean steps and the median seconds, and draws
steps as a running mean and seconds as a running median (one slow edit, e.g. the first
with its prefix sampling, would dominate a mean). Steps are the figure to compare across
runs: seconds depend on what else the machine ran (long runs here share two cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from wise_edit.core.persistence import STATE_FILE


def edit_log(save: Path) -> list[dict]:
    """The edit log of a saved editor (its folder, or a bench run's folder)."""
    for candidate in (save / STATE_FILE, save / "checkpoint" / "editor" / STATE_FILE):
        if candidate.is_file():
            return json.loads(candidate.read_text())["edit_log"]
    raise FileNotFoundError(f"{save}: no {STATE_FILE} of a saved editor")


def run_name(save: Path) -> str:
    """A bench run's name for its save (``runs/NAME/checkpoint/editor`` -> NAME)."""
    parts = [p for p in save.parts if p not in ("editor", "checkpoint")]
    return parts[-1] if parts else str(save)


def blocks(log: list[dict], window: int) -> list[tuple[int, float, float]]:
    """(first edit, mean steps, median seconds) of each block of ``window`` edits."""
    out = []
    for start in range(0, len(log), window):
        part = log[start : start + window]
        steps = statistics.mean(e["steps"] for e in part)
        out.append((start, steps, statistics.median(e["seconds"] for e in part)))
    return out


def running(values: list[float], window: int, stat=statistics.mean) -> list[float]:
    """``stat`` of the last ``window`` values at each position (fewer at the start)."""
    return [stat(values[max(0, i + 1 - window) : i + 1]) for i in range(len(values))]


def plot(logs: dict[str, list[dict]], window: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for name, log in logs.items():
        x = list(range(len(log)))
        ax_steps.plot(x, running([e["steps"] for e in log], window), label=name)
        seconds = [e["seconds"] for e in log]
        ax_s.plot(x, running(seconds, window, statistics.median), label=name)
    ax_steps.set_ylabel(f"forwards per edit (running mean of {window})")
    ax_s.set_ylabel(f"seconds per edit (running median of {window})")
    for ax in (ax_steps, ax_s):
        ax.set_xlabel("edit position in the stream")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    ax_steps.legend(fontsize=8)
    fig.suptitle("Cost of an edit along the stream (seconds: shared machine, read steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("saves", nargs="+", type=Path, help="saved editors or bench runs")
    parser.add_argument("--window", type=int, default=50, help="edits per block")
    parser.add_argument("--plot", help="draw steps and seconds along the stream to this PNG")
    args = parser.parse_args()
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    logs = {run_name(save): edit_log(save) for save in args.saves}
    for name, log in logs.items():
        print(f"{name}: {len(log)} edits")
        print(f"{'edits':>11}  {'steps/edit':>10}  {'median s/edit':>13}")
        for start, steps, seconds in blocks(log, args.window):
            end = min(start + args.window, len(log))
            print(f"{start:>5}-{end - 1:<5}  {steps:>10.1f}  {seconds:>13.2f}")
    if args.plot:
        plot(logs, args.window, args.plot)


if __name__ == "__main__":
    main()
