"""What an edited model actually answers: for each edited record, the answer to its prompt
and to its paraphrase (generated until the model stops, as answer EM scores it), whether
each is exact, and which memory answered; with ``--kinds ...,locality`` also its locality
probe, "exact" when the edited model's answer is the unedited one's. For reading a bench's
misses, not for scores.

    python benchmarks/inspect_answers.py --save runs/zsre-T100-raw-retrieve/checkpoint/editor \\
        --data zsre --edits 100 --out runs/zsre-T100-raw-retrieve/answers.jsonl
    python benchmarks/inspect_answers.py --save runs/cf-T1000/checkpoint/editor \\
        --data counterfact --edits 1000 --sample 200 --kinds locality
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from wise_edit import load_editor, models
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.evaluation import sample_indices
from wise_edit.metrics import ANSWER_NEW_TOKENS, answer_text, exact_answer, greedy_continuation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", required=True, help="an editor save (save_pretrained)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda", ...')
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--edits", type=int, required=True, help="the first N records")
    parser.add_argument("--out", type=Path, help="write one JSON line per record here")
    parser.add_argument(
        "--sample", type=int, default=None, help="only the records bench --eval-sample scores"
    )
    parser.add_argument("--kinds", default="prompt,rephrase", help="of prompt, rephrase, locality")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")

    model, tokenizer = models.load(args.model, device=args.device)
    editor = load_editor(model, tokenizer, args.save)
    fmt = editor.format
    records = load_dataset(args.data, args.data_dir, args.edits)
    if editor.num_edits != len(records):
        print(f"note: the save holds {editor.num_edits} edits, scoring {len(records)} records")
    targets: dict[int, list[str]] = {}
    for j, entry in enumerate(editor.edit_log):
        targets.setdefault(editor.memory_holding(j), []).append(entry["target"])
    rows = []
    with torch.no_grad():
        for i in sample_indices(len(records), args.sample):
            record = records[i]
            row = {"index": i, "target": record.target}
            probes = {"prompt": record.prompt, "rephrase": record.rephrase, "locality": record.loc}
            for kind in kinds:
                prompt = probes[kind]
                if not prompt:
                    continue
                ids = greedy_continuation(model, fmt, prompt, ANSWER_NEW_TOKENS)
                answer = answer_text(fmt, ids)
                if kind == "locality":  # unchanged, as generated Loc compares them
                    with editor.disabled():
                        exact = ids == greedy_continuation(model, fmt, prompt, ANSWER_NEW_TOKENS)
                else:
                    exact = bool(exact_answer(answer, record.target))
                memory = editor.routed([prompt])[0]
                row[kind] = {
                    "text": prompt,
                    "answer": answer,
                    "exact": exact,
                    "memory": memory,
                    "own_memory": editor.memory_holding(i),
                    # a miss that says an answer the memory was taught, to another prompt
                    "a_target_of_the_memory": any(
                        exact_answer(answer, t) for t in targets.get(memory, ())
                    ),
                }
            rows.append(row)
            print(_line(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(_summary(rows))


KINDS = ("prompt", "rephrase", "locality")


def _line(row: dict) -> str:
    parts = [f"{row['index']:4d} target={row['target']!r}"]
    for kind in KINDS:
        if kind in row:
            r = row[kind]
            mark = "ok " if r["exact"] else "MISS"
            parts.append(f"{kind[:3]} {mark} mem {r['memory']:>3} answer={r['answer']!r}")
    return " | ".join(parts)


def _summary(rows: list[dict]) -> str:
    """Misses sorted by cause: routed elsewhere (to no memory / another memory), or routed
    to the edit's own memory and answered wrong there. For a locality probe a "miss" is
    a changed answer, and "own memory" the memory of the edit the probe belongs to."""
    out = []
    for kind in KINDS:
        causes: Counter[str] = Counter()
        for row in rows:
            r = row.get(kind)
            if r is None:
                continue
            if r["exact"]:
                causes["exact"] += 1
            elif r["memory"] < 0:
                causes["miss: routed to no memory"] += 1
            elif r["own_memory"] is not None and r["memory"] != r["own_memory"]:
                causes["miss: routed to another memory"] += 1
            else:
                causes["miss: own memory, wrong answer"] += 1
            if not r["exact"] and r.get("a_target_of_the_memory"):
                causes["(of the misses: said a target the memory was taught)"] += 1
        if causes:
            out.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(causes.items())))
    return "\n".join(out)


if __name__ == "__main__":
    main()
