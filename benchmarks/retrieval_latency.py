"""Forward latency of WISE-Retrieve with many side memories: every memory scored (dense)
against the retrieval index (only the memories of each sequence's nearest edit keys are
scored), on the bundled SmolLM2.

The memories are synthetic so that hundreds can be built in seconds: memory i is a
rank-1 change keyed on a real ZsRE prompt (its delta maps that prompt's mean value-matrix
input to a fixed direction), with the usual threshold (0.88 x its prompt's score). The
cost of scoring a memory does not depend on what it holds, so the latency figures are
those of trained memories; the routing agreement says whether the index picks what dense
scoring picks on these memories, not how well trained memories route.

    python benchmarks/retrieval_latency.py --memories 20 100 200 600 --candidates 8
"""

from __future__ import annotations

import argparse

import torch

from wise_edit import WiseConfig, WiseEditor, models
from wise_edit.data import default_data_dir, load_zsre
from wise_edit.evaluation import latency_ratio
from wise_edit.wise.router import mean_inputs


def build(editor: WiseEditor, prompts: list[str], count: int) -> None:
    """``count`` rank-1 memories keyed on ``prompts`` (cycled)."""
    acts, mask = editor._prompt_batch_acts(prompts)
    means = mean_inputs(acts, mask)  # (P, I)
    out_dim = editor.layer.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        p = i % len(prompts)
        key = means[p]
        direction = torch.randn(out_dim, generator=gen)
        delta = torch.outer(direction / direction.norm(), key / key.norm() ** 2) * 0.5
        memory = editor.layer.new_memory()
        memory.add_edit(
            i, 0, delta.to(memory.delta.device), [torch.ones_like(delta, dtype=torch.bool)]
        )
        memory.add_key(key)
        memory.refresh_threshold(acts[p : p + 1], mask[p : p + 1], 0.88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, nargs="+", default=[20, 100, 200, 600])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2-135m")
    records = load_zsre(args.data_dir, limit=max(args.memories))
    probe = [r.prompt for r in records[:16]] + [r.loc for r in records[:16] if r.loc]
    rephrased = [r.rephrase for r in records[:16] if r.rephrase]
    print(
        f"batch of {len(probe)} prompts (16 edit prompts, 16 unrelated), median of {args.repeats}"
    )
    print("| memories | dense x | index x | routing agreement (edit / rephrase / unrelated) |")
    print("|---|---|---|---|")
    for count in args.memories:
        editor = WiseEditor(model, tokenizer, WiseConfig.for_model(model, mode="retrieve"))
        build(editor, [r.prompt for r in records[:count]], count)
        dense = latency_ratio(editor, probe, args.repeats)["ratio"]
        dense_route = [editor.routed(g) for g in (probe[:16], rephrased, probe[16:])]
        editor.layer.candidates = args.candidates
        index = latency_ratio(editor, probe, args.repeats)["ratio"]
        index_route = [editor.routed(g) for g in (probe[:16], rephrased, probe[16:])]
        agree = [
            sum(a == b for a, b in zip(d, s)) / len(d) for d, s in zip(dense_route, index_route)
        ]
        print(
            f"| {count} | {dense:.2f} | {index:.2f} | "
            + " / ".join(f"{a:.2f}" for a in agree)
            + " |",
            flush=True,
        )
        editor.detach()


if __name__ == "__main__":
    main()
