"""`wise-edit bench`: the evaluation protocol on a real model, written to results.json,
results.md and routing.png."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from . import metrics, models
from .core.draft import Editor
from .data import (
    EditRecord,
    load_dataset,
    load_hallucination,
    load_temporal,
    load_zsre_irrelevant,
)
from .evaluation import BenchResult, latency_ratio, run_protocol
from .methods import editor_class, make_config

logger = logging.getLogger(__name__)


def run_bench(args: argparse.Namespace) -> BenchResult:
    """``args``: the `wise-edit bench` options, with the config overrides already parsed
    into ``args.overrides``."""
    cls = editor_class(args.method)
    data_dir = Path(args.data_dir)
    records = load_dataset(args.data, data_dir, limit=args.edits)
    if len(records) < args.edits:
        raise ValueError(f"{args.data} has only {len(records)} records, asked for {args.edits}")
    pool = _irrelevant_pool(args.data, data_dir)
    model, tokenizer = models.load(args.model)
    config = make_config(cls, model, args.overrides)
    mode = cls.variant_of(config)
    name = args.method.lower() + (f"-{mode}" if mode else "")
    out = Path(args.out or f"runs/{args.data}-T{args.edits}-{name}")
    out.mkdir(parents=True, exist_ok=True)

    def make_editor() -> Editor:
        return cls(model, tokenizer, config, irrelevant_prompts=pool)

    result, editor = run_protocol(
        model,
        tokenizer,
        records,
        make_editor,
        method=cls.method,
        mode=mode,
        dataset=args.data,
        chunk=args.chunk,
    )
    probe = [r.prompt for r in records[:16]] + [r.loc for r in records[:16] if r.loc]
    result.extra["latency"] = latency_ratio(editor, probe, repeats=args.latency_repeats)
    result.extra["config"] = config.to_dict()
    result.extra["model"] = args.model
    result.extra["command"] = "wise-edit " + " ".join(getattr(args, "argv", []) or [])
    result.extra.update(editor.summary())
    if args.chunk is None:
        result.extra.update(dataset_metrics(args.data, editor, records))
    routing = routing_scores(editor, records)
    if routing is not None:
        result.extra["routing"] = routing["summary"]
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    (out / "results.md").write_text(markdown_table(result, args))
    written = ["results.json", "results.md"]
    if routing is not None and routing["scores"]:
        plot_routing(routing, out / "routing.png")
        written.append("routing.png")
    print(markdown_table(result, args))
    print(f"wrote {', '.join(str(out / f) for f in written)}")
    return result


def _irrelevant_pool(dataset: str, data_dir: Path) -> list[str]:
    """The unrelated prompts the margin loss pushes away: ZsRE's NQ questions, or the
    training split of the other sets (as the paper's D_irr)."""
    if dataset == "zsre":
        return load_zsre_irrelevant(data_dir)
    loader = load_hallucination if dataset == "hallucination" else load_temporal
    return [r.prompt for r in loader(data_dir, split="train")]


def dataset_metrics(dataset: str, editor: Editor, records: list[EditRecord]) -> dict[str, Any]:
    """The set-specific metrics of the paper: Hallucination's perplexity of the target
    (lower is better) and Temporal's OOD Gen, each edited and pre-edit."""
    model, tokenizer = editor.model, editor.tokenizer
    if dataset == "hallucination":
        name, fn, pairs = "perplexity", metrics.perplexity, [(r.prompt, r.target) for r in records]
    elif dataset == "temporal":
        name, fn = "ood_gen", metrics.ood_success
        pairs = [
            (r.extra["ood_rephrase"], r.target) for r in records if r.extra.get("ood_rephrase")
        ]
    else:
        return {}

    def mean() -> float:
        return round(statistics.fmean(fn(model, tokenizer, p, t) for p, t in pairs), 4)

    edited = mean()
    with editor.disabled():
        pre = mean()
    return {name: {"edited": edited, "pre_edit": pre}}


def routing_scores(editor: Editor, records: list[EditRecord]) -> dict[str, Any] | None:
    """Which prompts reach the edits' memory: edit prompts, paraphrases and unrelated
    prompts, and for methods that route by a score against a threshold the scores (the
    paper's Figure 3). None for methods that edit the weights themselves."""
    if not editor.routes:
        return None
    groups = {
        "edit prompts": [r.prompt for r in records],
        "paraphrases": [r.rephrase for r in records if r.rephrase],
        "unrelated": [r.loc for r in records if r.loc],
    }
    scores: dict[str, list[float]] = {}
    routed: dict[str, float] = {}
    for name, prompts in groups.items():
        if not prompts:
            continue
        choice, best = editor.routing_detail(prompts)
        if best is not None:
            scores[name] = best
        routed[name] = sum(c >= 0 for c in choice) / len(choice)
    thresholds = list(editor.summary().get("thresholds", []))
    return {
        "scores": scores,
        "thresholds": thresholds,
        "summary": {"share_routed_to_side_memory": routed, "thresholds": thresholds},
    }


def plot_routing(routing: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s", path)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"edit prompts": "tab:red", "paraphrases": "tab:orange", "unrelated": "tab:blue"}
    for name, values in routing["scores"].items():
        ax.scatter(range(len(values)), values, s=14, label=name, color=colours.get(name))
    for i, eps in enumerate(routing["thresholds"]):
        ax.axhline(
            eps, color="black", lw=1, ls="--", label="threshold ε" if i == 0 else None, alpha=0.7
        )
    ax.set_xlabel("record")
    ax.set_ylabel("activation score Δact (best memory)")
    ax.set_title("Routing: side memory used above the threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_table(result: BenchResult, args: argparse.Namespace) -> str:
    tf, gen = result.teacher_forced, result.generated
    pre_tf, pre_gen = result.pre_edit["teacher_forced"], result.pre_edit["generated"]
    lat = result.extra.get("latency", {})
    title = f"{result.method}-{result.mode}" if result.mode else result.method
    lines = [
        f"### {title}, {result.dataset}, T = {result.edits}",
        "",
        "| | TF Rel | TF Gen | TF Loc | gen. EM Rel | gen. EM Gen | gen. Loc |",
        "|---|---|---|---|---|---|---|",
        f"| pre-edit | {_fmt(pre_tf.rel)} | {_fmt(pre_tf.gen)} | – | {_fmt(pre_gen.rel)} | "
        f"{_fmt(pre_gen.gen)} | – |",
        f"| edited | {_fmt(tf.rel)} | {_fmt(tf.gen)} | {_fmt(tf.loc)} | {_fmt(gen.rel)} | "
        f"{_fmt(gen.gen)} | {_fmt(gen.loc)} |",
        "",
        f"- seconds per edit: {result.seconds_per_edit:.2f}; mean steps per edit: "
        f"{result.extra.get('steps_per_edit')}"
        + (f"; side memories: {result.extra['memories']}" if "memories" in result.extra else "")
        + (f"; codebook keys: {result.extra['keys']}" if "keys" in result.extra else ""),
        f"- peak memory: {result.peak_memory_mb:.0f} MB",
    ]
    if lat:
        lines.append(
            f"- forward latency edited / unedited: {lat['ratio']:.3f} "
            f"({lat['edited_s'] * 1e3:.1f} ms vs {lat['unedited_s'] * 1e3:.1f} ms)"
        )
    for name in ("perplexity", "ood_gen"):
        if name in result.extra:
            value = result.extra[name]
            lines.append(
                f"- {name}: {value['edited']:.3f} edited, {value['pre_edit']:.3f} pre-edit"
            )
    routed = result.extra.get("routing", {}).get("share_routed_to_side_memory", {})
    if routed:
        lines.append(
            "- routed to the edits' memory: " + ", ".join(f"{k} {v:.2f}" for k, v in routed.items())
        )
    return "\n".join(lines) + "\n"


def comparison_table(runs: list[str]) -> str:
    """One row per bench run (folder or results.json): Rel/Gen/Loc of both metric kinds
    and seconds per edit, sorted by dataset, T, then the order given."""
    rows = []
    for order, run in enumerate(runs):
        path = Path(run)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no results.json (is it a `wise-edit bench` folder?)")
        data = json.loads(path.read_text())
        rows.append((data["dataset"], data["edits"], order, data))
    lines = [
        "| method | data | T | TF Rel | TF Gen | TF Loc | gen. Rel | gen. Gen | gen. Loc "
        "| s/edit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset, edits, _, data in sorted(rows, key=lambda r: r[:3]):
        tf, gen = data["teacher_forced"], data["generated"]
        name = data["method"] + (f"-{data['mode']}" if data.get("mode") else "")
        cells = [tf["rel"], tf["gen"], tf["loc"], gen["rel"], gen["gen"], gen["loc"]]
        lines.append(
            f"| {name} | {dataset} | {edits} | "
            + " | ".join(_fmt(c) for c in cells)
            + f" | {data['seconds_per_edit']:.2f} |"
        )
    return "\n".join(lines) + "\n"
