# Experiment: Does decoding the evaluation's prompts in batches of one token length change any
#   answer, and how much faster is it?
# Decided: No answer changed (0 of 600 decodings) at 2.66x the speed; the bench decodes in unpadded
#   batches of 16 by default (`--decode-batch`)
# Ran at: 25b8bb8, as benchmarks/decode_batch.py. Output: docs/notebook/results/decode-batch/
"""Batched decoding in the evaluation (`Decoder.prefetch`, `wise-edit bench --decode-batch`)
against decoding each prompt alone: the time, and whether any answer changes.

Decodes what answer EM reads for a seeded sample of records (edit prompts, paraphrases,
locality probes; the protocol's budgets) on the same model state twice, once a prompt at a
time and once in batches of one token length, and prints the ratio of the times, how many
of the decodings differ, and answer EM Rel / Gen / Loc from each. Either a saved editor
(edit i is record i of --data) or, without --save, the unedited model:

    python benchmarks/decode_batch.py --save runs/zsre-T1000/checkpoint/editor --edits 1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from wise_edit import WiseEditor, models
from wise_edit.core.prompts import PromptFormat
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.evaluation import ANSWER_EM, sample_indices
from wise_edit.metrics import Decoder, answer_text, exact_answer


def decode_all(decode: Decoder, wanted: list[tuple[str, int]]) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    decode.prefetch(wanted)
    ids = [decode(prompt, budget) for prompt, budget in wanted]
    return ids, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", help="a saved WISE editor (default: the unedited model)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--data", default="zsre")
    parser.add_argument("--edits", type=int, required=True, help="records edited (T)")
    parser.add_argument("--sample", type=int, default=100, help="records decoded")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()

    records = load_dataset(args.data, args.data_dir, limit=args.edits)
    records = [records[i] for i in sample_indices(len(records), args.sample)]
    model, tokenizer = models.load(args.model, device=args.device)
    if args.save:
        editor = WiseEditor.from_pretrained(model, tokenizer, args.save)
        model, fmt = editor.model, editor.format
    else:
        fmt = PromptFormat.create(tokenizer, "raw")
    wanted = ANSWER_EM.decodings(fmt, records, probes=True)
    with torch.no_grad():
        alone, alone_s = decode_all(Decoder(model, fmt, batch_size=1), wanted)
        batched, batched_s = decode_all(Decoder(model, fmt, batch_size=args.batch), wanted)
    differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    probes = {r.loc for r in records if r.loc}

    def em(decodings: list[list[int]]) -> dict[str, float]:
        said = {prompt: answer_text(fmt, ids) for (prompt, _), ids in zip(wanted, decodings)}
        rel = [exact_answer(said[r.prompt], r.target) for r in records]
        gen = [exact_answer(said[r.rephrase], r.target) for r in records if r.rephrase]
        return {"rel": round(statistics.fmean(rel), 4), "gen": round(statistics.fmean(gen), 4)}

    figures = {
        "decodings": len(wanted),
        "distinct prompts": len({p for p, _ in wanted}),
        "batch": args.batch,
        "seconds alone": round(alone_s, 1),
        "seconds batched": round(batched_s, 1),
        "speed-up": round(alone_s / batched_s, 2),
        "decodings that differ": len(differ),
        "answer EM alone": em(alone),
        "answer EM batched": em(batched),
        "locality probes that differ": sum(
            a != b for (prompt, _), a, b in zip(wanted, alone, batched) if prompt in probes
        ),
    }
    for name, value in figures.items():
        print(f"{name}: {value}")
    for i in differ[:10]:
        print(
            f"  differs: {wanted[i][0]!r}\n    alone:   {tokenizer.decode(alone[i])!r}"
            f"\n    batched: {tokenizer.decode(batched[i])!r}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
