# Experiment: How many edits does one side memory hold, sharded under each merge method (the paper's
#   Table 11) or not?
# Decided: ~30 of its first 50 and ~80 of 200 on SmolLM2; sharding did not help (4x the steps, fewer
#   held), so the preset stays unsharded and Retrieve closes a memory every 5 edits
# Ran at: 6b63835, as benchmarks/memory_capacity.py. Output: docs/notebook/results/memory-capacity/,
#   docs/notebook/results/table11-50/
"""How many edits one side memory holds: WISE-Merge (a single memory for the whole stream)
with knowledge sharding off (the SmolLM2 preset) and on under each merge method (the
paper's Table 11), every edit made so far re-scored every N edits.

    python benchmarks/memory_capacity.py --edits 200 --every 50 --settings unsharded,ties
    python benchmarks/memory_capacity.py --edits 200 --every 50 \\
        --settings unsharded,ties,linear,slerp,dare,dare_ties,sign --plot capacity.png

A record is "held" when teacher-forced greedy decoding gives every token of its target
(the paper's Rel at 1.0). The table gives, at each checkpoint, the share of all edits so
far that are held and the share of the first N (the oldest) still held: a memory that
loses early edits to later ones shows it in the second. Each setting edits the same
records from a freshly loaded model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import add_settings, chosen_settings, editing_parser, fresh_editor, overrides

from wise_edit import WiseEditor
from wise_edit.data import load_zsre
from wise_edit.metrics import token_accuracy
from wise_edit.wise.merging import MERGE_METHODS

# the preset keeps ~49 edits per merge on SmolLM2's 576x1536 matrix with one shard;
# sharded settings keep the same edits per merge (2 shards x 25) and the paper's rho/k
SHARDED = {"mask_ratio": 0.2, "shards_per_merge": 2, "shard_size": 25, "merge_density": 0.53}
SETTINGS: dict[str, dict[str, Any]] = {"unsharded": {}} | {
    name: {**SHARDED, "merge_method": name} for name in MERGE_METHODS
}
COMMON = {"mode": "merge", "prompt_format": "raw"}


def held(editor: WiseEditor, records: list[Any]) -> list[bool]:
    fmt = editor.format
    return [token_accuracy(editor.model, fmt, r.prompt, r.target) == 1.0 for r in records]


def run(setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    editor = fresh_editor(args, {**COMMON, **args.overrides, **setting})
    records = load_zsre(args.data_dir, limit=args.edits)
    curve, seconds = [], []
    for start in range(0, len(records), args.every):
        began = time.perf_counter()
        batch = records[start : start + args.every]
        results = editor.edit_many([(r.prompt, r.target) for r in batch])
        seconds.append((time.perf_counter() - began) / len(batch))
        done = records[: start + args.every]
        with torch.no_grad():
            flags = held(editor, done)
            routed = [m >= 0 for m in editor.routed([r.prompt for r in done])]
        curve.append(
            {
                "edits": len(done),
                "held": sum(flags) / len(flags),
                "oldest held": sum(flags[: args.every]) / len(flags[: args.every]),
                "routed": sum(routed) / len(routed),
                "steps": statistics.fmean(r.steps for r in results),
            }
        )
        print(f"  {json.dumps(curve[-1])}", flush=True)
    return {"curve": curve, "s_per_edit": statistics.fmean(seconds)}


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        xs = [p["edits"] for p in result["curve"]]
        ax.plot(xs, [p["held"] for p in result["curve"]], marker="o", label=name)
    ax.set_xlabel("edits in the one side memory")
    ax.set_ylabel("share of edits held (teacher-forced Rel = 1)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = editing_parser(__doc__, edits=200)
    parser.add_argument("--every", type=int, default=50)
    add_settings(parser, SETTINGS, default="unsharded,ties")
    parser.add_argument("--plot", default=None, help="write the curves to this PNG")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--load", nargs="+", default=None, help="report (and plot) --out files instead of editing"
    )
    args = parser.parse_args()
    names = chosen_settings(parser, args, SETTINGS)
    if args.every < 1 or args.edits < args.every:
        parser.error("need 1 <= --every <= --edits")
    args.overrides = overrides(args)
    torch.manual_seed(0)
    results: dict[str, dict[str, Any]] = {}
    if args.load:
        for path in args.load:
            results |= json.loads(Path(path).read_text())
        names = list(results)
    for name in [] if args.load else names:
        print(f"{name}: {SETTINGS[name] or 'the preset'}", flush=True)
        results[name] = run(SETTINGS[name], args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(
        f"\n{args.edits} ZsRE edits into one memory (WISE-Merge) on {args.model} "
        f"({args.device}), common settings {COMMON | args.overrides}"
    )
    checkpoints = [p["edits"] for p in results[names[0]]["curve"]]
    print(f"{'setting':<12}" + "".join(f"{c:>14}" for c in checkpoints) + f"{'s/edit':>9}")
    for name, result in results.items():
        cells = "".join(f"{p['held']:>8.2f} /{p['oldest held']:>4.2f}" for p in result["curve"])
        print(f"{name:<12}{cells}{result['s_per_edit']:>9.2f}")
    print("(each cell: share of all edits so far held / share of the oldest --every held)")
    for name, result in results.items():
        routed = " ".join(f"{p['routed']:.2f}" for p in result["curve"])
        steps = " ".join(f"{p['steps']:.1f}" for p in result["curve"])
        print(f"{name}: edit prompts routed to the memory {routed}; steps/edit {steps}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
