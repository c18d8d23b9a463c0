# Experiment: Does the retrieval index (only the memories of the k nearest edit keys scored) route
#   trained memories as well as scoring every memory, and at what latency?
# Decided: With k = 4 it routes as well as dense scoring or better at 1.02-1.07x the unedited
#   forward (dense: 1.68-2.67x); `route_candidates` = 4 is the default
# Ran at: cdba639, as benchmarks/routing_index.py. Output:
#   docs/notebook/results/routing-index-T1000/, docs/notebook/results/routing-index-T3000/,
#   docs/notebook/results/zsre-T1000-raw-retrieve5/routing-index/,
#   docs/notebook/results/zsre-T100-raw-retrieve5-adam-stop02/routing-index/
"""Routing and forward latency of a trained WISE-Retrieve editor: every side memory scored
(dense) against the retrieval index (`WiseConfig.route_candidates` = k: only the memories
of each sequence's k nearest edit keys are scored, exactly), on the same prompts.

Reads a save, e.g. the last checkpoint of a long `wise-edit bench --checkpoint-every` run
(its edit i is record i of --data, ZsRE or CounterFact), and scores a seeded sample of
the edited records:

    python benchmarks/routing_index.py --save runs/zsre-T1000/checkpoint/editor \\
        --edits 1000 --sample 200 --candidates 4 8 16 32

Per setting: the share of edit prompts and of paraphrases routed to the memory that holds
their edit ("own"), the share of unrelated prompts (the records' locality probes) routed to
no memory, and the forward latency of the edited model over the unedited one (a batch of
16 edit prompts + 16 unrelated prompts, timed alternately, median of --repeats).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
from pathlib import Path

import torch

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.evaluation import latency_ratio

CHUNK = 32  # prompts per routing batch


def routes(editor: WiseEditor, prompts: list[str]) -> list[int]:
    out: list[int] = []
    for start in range(0, len(prompts), CHUNK):
        out += editor.routed(prompts[start : start + CHUNK])
    return out


def share(flags: list[bool]) -> float:
    return sum(flags) / max(1, len(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, help="a saved WISE-Retrieve editor")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--data", default="zsre", choices=["zsre", "counterfact"])
    parser.add_argument("--edits", type=int, required=True, help="records edited (T)")
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--candidates", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if any(k < 1 for k in args.candidates):
        parser.error("--candidates must be >= 1 (0, dense, is always measured)")

    model, tokenizer = models.load(args.model, device=args.device)
    editor = WiseEditor.from_pretrained(model, tokenizer, args.save)
    if editor.num_edits != args.edits:
        parser.error(f"{args.save} holds {editor.num_edits} edits, not --edits {args.edits}")
    records = load_dataset(args.data, args.data_dir, limit=args.edits)
    picked = sorted(random.Random(0).sample(range(args.edits), min(args.sample, args.edits)))
    own = [editor.memory_holding(i) for i in picked]
    with_para = [(i, o) for i, o in zip(picked, own) if records[i].rephrase]
    prompts = [records[i].prompt for i in picked]
    paraphrases = [records[i].rephrase for i, _ in with_para]
    unrelated = [records[i].loc for i in picked if records[i].loc]
    probe = prompts[:16] + unrelated[:16]

    print(
        f"{args.save}: {editor.num_edits} edits in {len(editor.memories)} side memories; "
        f"{len(picked)} sampled records (seed 0); torch threads {torch.get_num_threads()}"
    )
    header = "| scored memories | edit -> own | paraphrase -> own | unrelated -> none | forward x |"
    print(header + "\n|---|---|---|---|---|")
    rows = []
    for k in [0, *args.candidates]:
        editor.layer.candidates = k
        got_prompts = routes(editor, prompts)
        got_para = routes(editor, paraphrases)
        got_unrel = routes(editor, unrelated)
        row = {
            "candidates": k,
            "edit_own": share([g == o for g, o in zip(got_prompts, own)]),
            "paraphrase_own": share([g == o for g, (_, o) in zip(got_para, with_para)]),
            "unrelated_none": share([g == -1 for g in got_unrel]),
            "latency": latency_ratio(editor, probe, args.repeats),
        }
        rows.append(row)
        label = "all (dense)" if k == 0 else f"k = {k} nearest keys"
        print(
            f"| {label} | {row['edit_own']:.3f} | {row['paraphrase_own']:.3f} | "
            f"{row['unrelated_none']:.3f} | {row['latency']['ratio']:.3f} |",
            flush=True,
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:.0f} MB")
    if args.out:
        summary = {
            "save": args.save,
            "edits": editor.num_edits,
            "memories": len(editor.memories),
            "sample": len(picked),
            "threads": torch.get_num_threads(),
            "rows": rows,
            "peak_rss_mb": round(peak_mb),
        }
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
