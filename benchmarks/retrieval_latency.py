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
    python benchmarks/retrieval_latency.py --memories 1 20 100 200 600 --plot fig6.png

``--plot`` draws the paper's Figure 6 from these figures: forward latency over the
unedited model's against the number of edits, for WISE-Merge (one side memory, whatever
the number of edits: the row with 1 memory), WISE-Retrieve scoring every memory, and
WISE-Retrieve with the index (``--edits-per-memory`` edits per memory, 5 by default).
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
        ones = [torch.ones_like(delta, dtype=torch.bool)]
        no_subject = torch.zeros(out_dim)
        memory.add_edit(i, 0, delta.to(memory.delta.device), ones, key, no_subject)
        memory.refresh_threshold(acts[p : p + 1], mask[p : p + 1], 0.88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, nargs="+", default=[20, 100, 200, 600])
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--plot", help="write the latency-vs-edits figure (PNG) here")
    parser.add_argument("--edits-per-memory", type=int, default=5)
    args = parser.parse_args()
    if args.plot and 1 not in args.memories:
        parser.error("--plot needs a row with 1 memory (WISE-Merge's cost): add 1 to --memories")
    model, tokenizer = models.load("smollm2-135m")
    records = load_zsre(args.data_dir, limit=max(args.memories))
    probe = [r.prompt for r in records[:16]] + [r.loc for r in records[:16] if r.loc]
    rephrased = [r.rephrase for r in records[:16] if r.rephrase]
    print(
        f"batch of {len(probe)} prompts (16 edit prompts, 16 unrelated), median of {args.repeats}"
    )
    print("| memories | dense x | index x | routing agreement (edit / rephrase / unrelated) |")
    print("|---|---|---|---|")
    figures: dict[int, tuple[float, float]] = {}
    for count in args.memories:
        editor = WiseEditor(
            model, tokenizer, WiseConfig.for_model(model, **{"memory.mode": "retrieve"})
        )
        build(editor, [r.prompt for r in records[:count]], count)
        editor.layer.candidates = 0  # every memory scored (the config's default is the index)
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
        figures[count] = (dense, index)
    if args.plot:
        plot(figures, args.edits_per_memory, args.candidates, args.plot)


def plot(figures: dict[int, tuple[float, float]], per_memory: int, k: int, path: str) -> None:
    """Figure 6: latency over the unedited model's against the number of edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(c for c in figures if c > 1)
    edits = [c * per_memory for c in counts]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(edits, [1.0] * len(edits), "k--", label="unedited")
    ax.plot(edits, [figures[1][0]] * len(edits), "o-", label="WISE-Merge (one memory)")
    ax.plot(edits, [figures[c][0] for c in counts], "s-", label="WISE-Retrieve, every memory")
    ax.plot(edits, [figures[c][1] for c in counts], "^-", label=f"WISE-Retrieve, index (k = {k})")
    ax.set_xlabel(f"edits ({per_memory} per side memory)")
    ax.set_ylabel("forward latency / unedited")
    ax.set_title("SmolLM2-135M, CPU: inference cost vs number of edits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
