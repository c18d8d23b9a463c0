"""What an edited model actually answers: for each edited record, the answer to its prompt
and to its paraphrase (generated until the model stops, as answer EM scores it), whether
each is exact, and which memory answered. For reading a bench's misses, not for scores.

    python benchmarks/inspect_answers.py --save runs/zsre-T100-raw-retrieve/checkpoint/editor \\
        --data zsre --edits 100 --out runs/zsre-T100-raw-retrieve/answers.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from wise_edit import load_editor, models
from wise_edit.data import default_data_dir, load_dataset
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
    args = parser.parse_args()

    model, tokenizer = models.load(args.model, device=args.device)
    editor = load_editor(model, tokenizer, args.save)
    fmt = editor.format
    records = load_dataset(args.data, args.data_dir, args.edits)
    if editor.num_edits != len(records):
        print(f"note: the save holds {editor.num_edits} edits, scoring {len(records)} records")
    rows = []
    with torch.no_grad():
        for i, record in enumerate(records):
            row = {"index": i, "target": record.target}
            for kind, prompt in (("prompt", record.prompt), ("rephrase", record.rephrase)):
                if not prompt:
                    continue
                ids = greedy_continuation(model, fmt, prompt, ANSWER_NEW_TOKENS)
                answer = answer_text(fmt, ids)
                row[kind] = {
                    "text": prompt,
                    "answer": answer,
                    "exact": bool(exact_answer(answer, record.target)),
                    "memory": editor.routed([prompt])[0],
                    "own_memory": _memory_of_edit(editor, i),
                }
            rows.append(row)
            print(_line(row), flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(_summary(rows))


def _memory_of_edit(editor, index: int) -> int | None:  # noqa: ANN001
    """The side memory that holds edit ``index`` (WISE), else None."""
    holding = getattr(editor, "memory_holding", None)
    return holding(index) if holding is not None else None


def _line(row: dict) -> str:
    parts = [f"{row['index']:4d} target={row['target']!r}"]
    for kind in ("prompt", "rephrase"):
        if kind in row:
            r = row[kind]
            mark = "ok " if r["exact"] else "MISS"
            parts.append(f"{kind[:3]} {mark} mem {r['memory']:>3} answer={r['answer']!r}")
    return " | ".join(parts)


def _summary(rows: list[dict]) -> str:
    """Misses sorted by cause: routed elsewhere (to no memory / another memory), or routed
    to the edit's own memory and answered wrong there."""
    out = []
    for kind in ("prompt", "rephrase"):
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
        out.append(f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(causes.items())))
    return "\n".join(out)


if __name__ == "__main__":
    main()
