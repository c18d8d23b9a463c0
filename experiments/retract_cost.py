# Experiment: What does retracting one edit cost, WISE-Merge against WISE-Retrieve?
# Decided: Merge retrains every other edit of the stream (9 of 10), Retrieve only its memory's
#   others (at most shard_size - 1); documented as the cost of `retract`, nothing changed
# Ran at: 89c27d4, as benchmarks/retract_cost.py. Output: in docs/notebook/RESULTS.md only
"""What retracting one edit costs, WISE-Merge against WISE-Retrieve: T synthetic edits,
then the first one retracted; seconds and edits retrained, next to seconds per edit.

    python benchmarks/retract_cost.py --model smollm2-135m --edits 10 --set shard_size 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wise_edit import WiseConfig, WiseEditor, models


def run(mode: str, args: argparse.Namespace) -> dict[str, float]:
    model, tokenizer = models.load(args.model)
    config = WiseConfig.for_model(model, mode=mode, **dict(args.set))
    editor = WiseEditor(model, tokenizer, config)
    records = [
        (f"What is the code of vault number {i}?", f"The code is {1000 + i}")
        for i in range(args.edits)
    ]
    per_edit = [editor.edit(p, t).seconds for p, t in records]
    started = time.perf_counter()
    cost = editor.retract(0)
    return {
        "s_per_edit": statistics.mean(per_edit),
        "retract_s": time.perf_counter() - started,
        "retrained": cost["retrained_edits"],
        "memories": len(editor.memories),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument(
        "--set", nargs=2, action="append", default=[], metavar=("FIELD", "INT"), type=str
    )
    parser.add_argument("--modes", nargs="+", default=["merge", "retrieve"])
    args = parser.parse_args()
    args.set = [(k, int(v)) for k, v in args.set]
    torch.manual_seed(0)
    print("| mode | T | s/edit | retract s | edits retrained | memories |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        r = run(mode, args)
        print(
            f"| {mode} | {args.edits} | {r['s_per_edit']:.2f} | {r['retract_s']:.2f} | "
            f"{r['retrained']} | {r['memories']} |"
        )


if __name__ == "__main__":
    main()
