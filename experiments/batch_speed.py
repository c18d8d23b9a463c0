"""Edits one at a time against edits trained together (`edit_many(batch=K)`) on the
bundled model with the defaults: seconds per edit, and how far the batched memories are
from the sequential ones (they should differ by rounding only).

    python experiments/batch_speed.py --edits 32 --batches 8 16 32

Each protocol starts from a fresh editor on the same records (ZsRE, from --start on).
Decided: see docs/notebook/RESULTS.md "Edits in batches".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from wise_edit import WiseConfig, WiseEditor, models
from wise_edit.bench import _irrelevant_pool
from wise_edit.data import default_data_dir, load_dataset


def run(model, tok, records, pool, batch: int | None) -> tuple[WiseEditor, float]:
    editor = WiseEditor(model, tok, WiseConfig.for_model(model), irrelevant_prompts=pool)
    started = time.perf_counter()
    editor.edit_many([r.request() for r in records], batch=batch, progress=True)
    return editor, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--start", type=int, default=500)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data = Path(default_data_dir())
    records = load_dataset("zsre", data, limit=args.start + args.edits)[args.start :]
    pool = _irrelevant_pool("zsre", data)
    model, tok = models.load("smollm2-135m")
    probes = [r.prompt for r in records] + [r.rephrase for r in records if r.rephrase]
    rows = []
    alone, seconds = run(model, tok, records, pool, None)
    reference = [m.change.dense() for m in alone.memories]
    routed = alone.routed(probes)
    steps = [e["steps"] for e in alone.edit_log]
    alone.detach()
    rows.append({"batch": 1, "s_per_edit": seconds / len(records), "steps": sum(steps)})
    for batch in args.batches:
        editor, seconds = run(model, tok, records, pool, batch)
        diffs = [
            ((m.change.dense() - ref).norm() / ref.norm()).item()
            for m, ref in zip(editor.memories, reference)
        ]
        rows.append(
            {
                "batch": batch,
                "s_per_edit": seconds / len(records),
                "steps": sum(e["steps"] for e in editor.edit_log),
                "same_steps": [e["steps"] for e in editor.edit_log] == steps,
                "max_rel_diff": max(diffs),
                "routing_agrees": sum(a == b for a, b in zip(editor.routed(probes), routed))
                / len(probes),
            }
        )
        editor.detach()
    for row in rows:
        row["speedup"] = rows[0]["s_per_edit"] / row["s_per_edit"]
        print(json.dumps(row))
    if args.out:
        meta = {"threads": torch.get_num_threads(), "edits": args.edits, "start": args.start}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
