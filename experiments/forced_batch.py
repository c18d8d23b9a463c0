# Experiment: Does teacher forcing in batches (`Decoder.prefetch_forced`) give the argmax
#   tokens of forcing each pair alone on the bundled model, and how much faster is it?
# Decided: see docs/notebook/RESULTS.md "Teacher forcing in batches".
# Ran at: the commit that added it (batched teacher forcing)
"""Teacher-forced argmax tokens of ZsRE prompts, paraphrases and locality probes on the
bundled model (unedited, chat form), forced one at a time and in batches of --batch:
how many pairs differ, and the seconds of each.

    python experiments/forced_batch.py --records 100 --batch 16
"""

from __future__ import annotations

import argparse
import time

from wise_edit import metrics, models
from wise_edit.core.prompts import PromptFormat
from wise_edit.data import default_data_dir, load_zsre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--start", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2-135m", device="cpu")
    fmt = PromptFormat.create(tokenizer, "auto")
    records = load_zsre(default_data_dir(), limit=args.start + args.records)[args.start :]
    pairs = [(p, r.target) for r in records for p in (r.prompt, r.rephrase) if p]
    pairs += [(r.loc, r.loc_ans) for r in records if r.loc and r.loc_ans]
    started = time.perf_counter()
    alone = [metrics.target_predictions(model, fmt, p, t) for p, t in pairs]
    alone_s = time.perf_counter() - started
    decode = metrics.Decoder(model, fmt, batch_size=args.batch, progress=False)
    started = time.perf_counter()
    decode.prefetch_forced(pairs)
    batched_s = time.perf_counter() - started
    batched = [decode.forced(p, t) for p, t in pairs]
    differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    tokens = sum(len(a) for a in alone)
    changed = sum(x != y for a, b in zip(alone, batched) for x, y in zip(a, b))
    print(f"{len(pairs)} pairs ({tokens} target tokens), format {fmt.kind}")
    print(f"pairs that differ: {len(differ)}; target tokens that differ: {changed}")
    print(
        f"one at a time {alone_s:.1f} s, batches of {args.batch} {batched_s:.1f} s: "
        f"{alone_s / batched_s:.2f}x"
    )


if __name__ == "__main__":
    main()
