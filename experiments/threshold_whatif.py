# Experiment: Would raising each memory's threshold above the other memories' edit prompts, a key
#   radius, or another threshold ratio route a saved Retrieve run better?
# Decided: Raised thresholds gained too little (.06 of CounterFact locality probes); a key radius of
#   ~0.75 became the default (`key_radius`, calibrated per model); `threshold_ratio` stays 0.88
# Ran at: 32bfc27, as benchmarks/threshold_whatif.py. Output:
#   docs/notebook/results/counterfact-T100-key-radius/,
#   docs/notebook/results/counterfact-T300-key-radius/, docs/notebook/results/threshold-ratio-T1000/
"""What if each side memory's threshold were raised above its scores on the *other*
memories' edit prompts? A what-if on a trained WISE-Retrieve save, before building it
into the editing loop.

Why: on CounterFact at T = 1000 a locality probe ("X lost their life at") is answered by
the memory of another edit in the same words ("Louis Vola lost their life at"), because
a memory's threshold (0.88 x the lowest score of its own edit prompts) never sees the
prompts of later edits that share its wording. Those prompts are known to the editor:
raising each memory's threshold to just above its highest score on any other edit's
prompt (capped at ``cap`` x its own lowest edit score, so its own edits still clear it)
is a scalar per memory, and this script measures what it would do to routing:

    python benchmarks/threshold_whatif.py --save runs/cf100/checkpoint/editor \\
        --data counterfact --edits 100 --same-form 100 --caps 0.9 0.95 0.99 \\
        --taus 0.5 0.6 0.7 0.75 0.8 0.85 0.9

A second rule is measured beside it, the key radius (`WiseConfig.key_radius`): a memory
may take a prompt only if one of its edits' keys (mean value-matrix input of the edit
prompt) lies within cosine ``tau`` of the prompt's (`--taus`), whatever its score. The
quartiles of that cosine are printed per group first (own memory's for edits and
paraphrases, the nearest memory's for the prompts that should reach none).

A third sweep, ``--ratios``, lowers or raises every threshold together: epsilon is
``threshold_ratio`` x a memory's lowest score on its own edit prompts and is used only for
routing, never in training, so scaling the saved thresholds by ratio / saved ratio is
exactly what an editor trained with that ratio would route. Routed through the editor's
own index and key radius, it shows what paraphrases a lower bar would win and what
prompts that should reach no memory it would let in.

A memory is frozen once it is closed, so its final scores on later edits' prompts are the
scores it would have had when those edits arrived: for closed memories the what-if is
the rule applied edit by edit. Routing here is dense (every memory scored, top-1, its
threshold); the saved thresholds are also routed through the editor itself (with its
retrieval index, `route_candidates`) for comparison. Routing shares only: what the
answers would be is for `wise-edit bench` once the rule is in the editor.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from wise_edit import WiseEditor, models
from wise_edit.data import default_data_dir, load_dataset
from wise_edit.wise.router import (
    candidate_memories,
    memory_nearness,
    route,
    route_sparse,
    within_radius,
)

CHUNK = 32  # prompts per scoring batch


def scores_of(editor: WiseEditor, prompts: list[str]) -> torch.Tensor:
    """(memories, prompts) activation scores, in chunks."""
    parts = [
        editor.activation_scores(prompts[i : i + CHUNK]) for i in range(0, len(prompts), CHUNK)
    ]
    return torch.cat(parts, dim=1)


def raised_thresholds(
    thresholds: torch.Tensor, edit_scores: torch.Tensor, owner: torch.Tensor, cap: float
) -> torch.Tensor:
    """Each memory's threshold raised to just above (x 1.01) its highest score on another
    memory's edit prompt, at most ``cap`` x its lowest score on its own edit prompts, never
    lowered. ``edit_scores`` (M, T): every memory on every edit prompt; ``owner`` (T,): the
    memory holding each edit."""
    mine = owner[None, :] == torch.arange(len(thresholds))[:, None]  # (M, T)
    others = edit_scores.masked_fill(mine, float("-inf")).max(dim=1).values * 1.01
    own_min = edit_scores.masked_fill(~mine, float("inf")).min(dim=1).values
    return torch.maximum(thresholds, torch.minimum(others, cap * own_min))


def share(flags: torch.Tensor) -> float:
    return round(float(flags.float().mean()), 3) if len(flags) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", required=True, help="a saved WISE-Retrieve editor")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="counterfact", help="the set the save was edited on")
    parser.add_argument("--data-dir", default=str(default_data_dir()))
    parser.add_argument("--edits", type=int, required=True, help="records edited (T)")
    parser.add_argument("--sample", type=int, default=200, help="records probed (seed 0)")
    parser.add_argument("--same-form", type=int, default=50, help="unedited records probed")
    parser.add_argument("--caps", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument(
        "--taus",
        type=float,
        nargs="+",
        default=[0.6, 0.7, 0.8, 0.9],
        help="key radii: a memory may take a prompt only if one of its edits' keys is this near",
    )
    parser.add_argument(
        "--ratios",
        type=float,
        nargs="*",
        default=[],
        help="threshold ratios (epsilon = ratio x a memory's lowest own edit score), routed "
        "through the editor's index",
    )
    parser.add_argument("--plot", help="draw the key-radius sweep to this PNG")
    parser.add_argument("--ratio-plot", help="draw the threshold-ratio sweep to this PNG")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if any(not 0 < c <= 1 for c in args.caps):
        parser.error("--caps must lie in (0, 1]: a memory's own edits must clear it")
    if any(not 0 < r <= 1 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1], as WiseConfig.threshold_ratio")

    model, tokenizer = models.load(args.model, device=args.device)
    editor = WiseEditor.from_pretrained(model, tokenizer, args.save)
    if editor.num_edits != args.edits:
        parser.error(f"{args.save} holds {editor.num_edits} edits, not --edits {args.edits}")
    loaded = load_dataset(args.data, args.data_dir, limit=args.edits + args.same_form)
    records = loaded[: args.edits]
    picked = sorted(random.Random(0).sample(range(args.edits), min(args.sample, args.edits)))
    owner = torch.tensor([editor.memory_holding(i) for i in range(args.edits)])
    with_para = [i for i in picked if records[i].rephrase]
    with_loc = [i for i in picked if records[i].loc]
    same_form = [r.prompt for r in loaded[args.edits :]]
    # each probed group: its prompts and the route each should take (-1: no memory)
    groups = {
        "edit -> own": ([records[i].prompt for i in picked], owner[picked]),
        "paraphrase -> own": ([records[i].rephrase for i in with_para], owner[with_para]),
        "locality -> none": ([records[i].loc for i in with_loc], torch.full((len(with_loc),), -1)),
        "same-form -> none": (same_form, torch.full((len(same_form),), -1)),
    }

    edit_scores = scores_of(editor, [r.prompt for r in records])  # (M, T)
    dense = {
        name: scores_of(editor, prompts)
        for name, (prompts, _) in groups.items()
        if name != "edit -> own"
    }
    dense["edit -> own"] = edit_scores[:, picked]
    saved = torch.tensor(editor.thresholds)

    def routing(thresholds: torch.Tensor) -> dict[str, float]:
        return {
            name: share(route(dense[name], thresholds) == want)
            for name, (_, want) in groups.items()
        }

    def through_index() -> dict[str, float]:
        return {
            name: share(torch.tensor(editor.routed(prompts), dtype=torch.long) == want)
            for name, (prompts, want) in groups.items()
        }

    rows: dict[str, dict[str, float]] = {}
    radius = editor.layer.radius
    if radius:  # the same index with and without the save's key radius
        rows[f"saved thresholds, the editor's index, key radius {radius:.3f}"] = through_index()
        editor.layer.radius = 0.0
        try:
            rows["saved thresholds, the editor's index, no key radius"] = through_index()
        finally:
            editor.layer.radius = radius
    else:
        rows["saved thresholds, the editor's index"] = through_index()
    queries = {name: editor.prompt_keys(prompts) for name, (prompts, _) in groups.items()}
    rows["saved thresholds, the editor's index, the top score answers (paper)"] = {
        name: share(index_route(dense[name], queries[name], editor, saved, top=True) == want)
        for name, (_, want) in groups.items()
    }
    rows["saved thresholds, dense"] = routing(saved)
    for cap in args.caps:
        raised = raised_thresholds(saved, edit_scores, owner, cap)
        row = routing(raised)
        row["memories raised"] = share(raised > saved)
        rows[f"raised, cap {cap} x own lowest, dense"] = row

    keys, key_owner = editor.edit_keys()
    memories = len(editor.memories)
    nearness = {name: memory_nearness(queries[name], keys, key_owner, memories) for name in groups}
    for tau in args.taus:
        rows[f"saved thresholds, key radius {tau}, dense"] = {
            name: share(route(within_radius(dense[name], nearness[name], tau), saved) == want)
            for name, (_, want) in groups.items()
        }
    saved_ratio = editor.config.threshold_ratio
    for ratio in args.ratios:
        thresholds = saved * (ratio / saved_ratio)
        rows[f"threshold ratio {ratio}, the editor's index"] = {
            name: share(index_route(dense[name], queries[name], editor, thresholds) == want)
            for name, (_, want) in groups.items()
        }
    print("nearest edit key (cosine), quartiles per group: own memory's where one is wanted")
    for name, (_, want) in groups.items():
        near = nearness[name]
        best = near.max(dim=0).values if (want < 0).all() else near[want, torch.arange(len(want))]
        quartiles = torch.quantile(best, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
        print(f"  {name}: p10/p25/p50/p75/p90 " + " ".join(f"{q:.3f}" for q in quartiles))

    print(
        f"{args.save}: {editor.num_edits} edits in {len(editor.memories)} memories; "
        f"{len(picked)} probed records (seed 0), {len(loaded) - args.edits} same-form"
    )
    columns = ["edit -> own", "paraphrase -> own", "locality -> none", "same-form -> none"]
    print("| thresholds | " + " | ".join(columns) + " | memories raised |")
    print("|---" * (len(columns) + 2) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" for c in columns] + [f"{row.get('memories raised', 0):.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"save": args.save, "rows": rows}, indent=2))
    if args.plot:
        sweep = {tau: rows[f"saved thresholds, key radius {tau}, dense"] for tau in args.taus}
        plot_sweep(
            sweep,
            rows["saved thresholds, dense"],
            columns,
            args.plot,
            "key radius (cosine to the nearest edit key of the memory)",
            "Key radius: locality gained, paraphrases lost (dotted: no radius)",
        )
        print(f"wrote {args.plot}")
    if args.ratio_plot and args.ratios:
        sweep = {r: rows[f"threshold ratio {r}, the editor's index"] for r in args.ratios}
        saved_row = next(iter(rows.values()))  # the saved thresholds through the index
        plot_sweep(
            sweep,
            saved_row,
            columns,
            args.ratio_plot,
            "threshold ratio (epsilon / lowest score on the memory's own edit prompts)",
            f"Threshold ratio: paraphrases against locality (dotted: saved, {saved_ratio})",
        )
        print(f"wrote {args.ratio_plot}")


def index_route(
    scores: torch.Tensor,
    queries: torch.Tensor,
    editor: WiseEditor,
    thresholds: torch.Tensor,
    top: bool = False,
) -> torch.Tensor:
    """Route as the editor's layer does (its index's k candidates within its key radius,
    top-1 by exact score unless the prompt repeats an edit's) against the given
    ``thresholds``; ``scores`` (M, B) dense. ``top``: the top-scoring candidate always
    answers, as in the paper's Algorithm 2 (the editor's rule before `35f463e`)."""
    keys, owners = editor.edit_keys()
    k = editor.config.route_candidates
    if not k or len(editor.memories) <= k:  # the layer scores every memory then
        k = len(keys)
    candidates, similarity = candidate_memories(queries, keys, owners, k, editor.key_radius or 0.0)
    return route_sparse(  # without the keys' cosines, route_sparse is the paper's rule
        candidates,
        lambda memory, rows: scores[memory, rows],
        thresholds,
        None if top else similarity,
    )


def plot_sweep(
    sweep: dict[float, dict[str, float]],
    without: dict[str, float],
    columns: list[str],
    path: str,
    xlabel: str,
    title: str,
) -> None:
    """Share of each probe group routed right along a sweep; dotted: the saved routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(sweep)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for column in columns:
        line = ax.plot(xs, [sweep[x][column] for x in xs], marker="o", label=column)
        ax.axhline(without[column], color=line[0].get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share routed right")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
