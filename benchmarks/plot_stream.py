"""Scores, forward latency and memory per edit against T, from `wise-edit bench` runs of
one stream (benchmarks/stream.sh: its milestones and its end), as one figure and a
markdown table. A milestone (a folder named ``*-T<N>-of-*``) is the stream's editor
reloaded and scored without editing, so its RAM figure lacks the replay cache an editing
run fills (each edit's prompt inputs, rebuilt as the editor edits again) and its peak
memory is the scoring's: RAM and peak memory are shown for editing runs only. Its s/edit
is the stream's own (each edit's seconds are in the copied edit log).

    python benchmarks/plot_stream.py runs/stream/counterfact-T*-of-10000 \
        runs/stream/counterfact-T10000-defaults --out runs/stream/counterfact-stream.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def point(folder: Path) -> dict[str, Any] | None:
    """One run's figures (None: the run has not finished)."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    extra = data.get("extra", {})
    reloaded = "-of-" in folder.name
    em, tf = data["scores"]["answer_em"], data["scores"]["teacher_forced"]
    return {
        "T": data["edits"],
        "rel": em["rel"],
        "gen": em["gen"],
        "loc": em["loc"],
        "tf_rel": tf["rel"],
        "tf_gen": tf["gen"],
        "tf_loc": tf["loc"],
        "latency": extra.get("latency", {}).get("ratio"),
        "saved_kb": extra.get("saved_kb_per_edit"),
        "ram_kb": None if reloaded else extra.get("ram_kb_per_edit"),
        "s_per_edit": data["seconds_per_edit"],
        "peak_mb": None if reloaded else data["peak_memory_mb"],
        "scored": extra.get("eval_sample", {}).get("records", data["edits"]),
    }


def _cell(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(points: list[dict[str, Any]]) -> str:
    head = (
        "| T | scored | answer EM Rel / Gen / Loc | TF Rel / Gen / Loc | forward vs unedited "
        "| KB/edit saved / RAM | s/edit | peak MB |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {p['T']} | {p['scored']} | {_cell(p['rel'])} / {_cell(p['gen'])} / {_cell(p['loc'])} "
        f"| {_cell(p['tf_rel'])} / {_cell(p['tf_gen'])} / {_cell(p['tf_loc'])} "
        f"| {_cell(p['latency'], 3)}x | {_cell(p['saved_kb'], 1)} / {_cell(p['ram_kb'], 1)} "
        f"| {_cell(p['s_per_edit'])} | {_cell(p['peak_mb'], 0)} |"
        for p in points
    ]
    return "\n".join([head, *rows])


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [p["T"] for p in points]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    scores, latency, memory = axes
    for key, label, style in (
        ("rel", "Rel", "o-"),
        ("gen", "Gen", "s-"),
        ("loc", "Loc", "^-"),
    ):
        scores.plot(ts, [p[key] for p in points], style, label=f"{label} (answer EM)")
    scores.plot(ts, [p["tf_gen"] for p in points], "s:", color="grey", label="Gen (TF)")
    scores.set(ylim=(0, 1.02), ylabel="score", title="scores of the final model")
    latency.plot(ts, [p["latency"] for p in points], "o-")
    latency.axhline(1.10, color="grey", ls=":", label="1.10x")
    top = max([1.15] + [p["latency"] + 0.02 for p in points if p["latency"] is not None])
    latency.set(ylabel="edited / unedited forward", title="forward latency", ylim=(0.9, top))
    memory.plot(ts, [p["saved_kb"] for p in points], "o-", label="saved")
    ram = [p for p in points if p["ram_kb"] is not None]
    memory.plot([p["T"] for p in ram], [p["ram_kb"] for p in ram], "s", label="RAM (editing)")
    memory.axhline(150, color="grey", ls=":", label="150 KB")
    memory.set(ylabel="KB per edit", title="memory per edit", ylim=(0, None))
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("edits made (T)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench output folders")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = parser.parse_args()
    found = [p for p in map(point, args.runs) if p is not None]
    missing = [str(r) for r in args.runs if point(r) is None]
    if missing:
        print(f"not finished, left out: {', '.join(missing)}")
    if not found:
        raise SystemExit("no finished run to plot")
    found.sort(key=lambda p: p["T"])
    plot(found, args.out)
    print(table(found))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
