"""Seconds per edit: the fast editing path against the plain full-model forward, measured
in one run on the same records and config (median over the edits).

    python benchmarks/edit_speed.py --edits 20
"""

from __future__ import annotations

import argparse
import statistics

import torch

from wise_edit import WiseConfig, WiseEditor, models
from wise_edit.data import default_data_dir, load_zsre, load_zsre_irrelevant


def run(fast: bool, args: argparse.Namespace) -> list[tuple[float, int]]:
    model, tokenizer = models.load(args.model)
    records = load_zsre(args.data_dir, limit=args.edits)
    pool = load_zsre_irrelevant(args.data_dir)
    config = WiseConfig.for_model(model, fast_path=fast, max_steps=args.steps)
    editor = WiseEditor(model, tokenizer, config, irrelevant_prompts=pool)
    out = []
    for record in records:
        result = editor.edit(record.prompt, record.target)
        out.append((result.seconds, result.steps))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--steps", type=int, default=70, help="max steps per edit")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for name, fast in (("fast path", True), ("full forward", False)):
        results = run(fast, args)
        seconds = [s for s, _ in results]
        per_step = [s / n for s, n in results]
        rows[name] = (
            statistics.median(seconds),
            statistics.median(per_step),
            sum(n for _, n in results),
        )
    print(f"{args.edits} ZsRE edits on {args.model}, torch threads {torch.get_num_threads()}")
    print(f"{'path':<14}{'median s/edit':>15}{'median s/step':>15}{'total steps':>13}")
    for name, (s_edit, s_step, steps) in rows.items():
        print(f"{name:<14}{s_edit:>15.3f}{s_step:>15.4f}{steps:>13}")
    fast, full = rows["fast path"], rows["full forward"]
    print(f"speed-up: {full[0] / fast[0]:.2f}x per edit, {full[1] / fast[1]:.2f}x per step")


if __name__ == "__main__":
    main()
