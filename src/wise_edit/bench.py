"""`wise-edit bench`: the evaluation protocol on a real model, written to results.json,
results.md and routing.png."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import metrics, models
from .core.draft import Editor
from .core.editor import EditorBase
from .core.prompts import PromptFormat
from .data import (
    EditRecord,
    load_counterfact_pool,
    load_dataset,
    load_hallucination,
    load_temporal,
    load_zsre_irrelevant,
    load_zsre_same_form,
)
from .evaluation import (
    PROTOCOL_FILE,
    BenchResult,
    Checkpointing,
    PreEdit,
    Scores,
    latency_ratio,
    run_protocol,
)
from .methods import editor_class, make_config, settings_that_differ
from .migrate import upgrade_config

# Records after the T edited ones whose prompts probe the router: unrelated prompts in
# the edits' own sentence form (at most this many).
SAME_FORM_PROBES = 50

logger = logging.getLogger(__name__)


def run_bench(args: argparse.Namespace) -> BenchResult:
    """``args``: the `wise-edit bench` options, with the config overrides already parsed
    into ``args.overrides``."""
    _check_counts(args)
    cls = editor_class(args.method)
    data_dir = Path(args.data_dir)
    loaded = load_dataset(args.data, data_dir, limit=args.edits + SAME_FORM_PROBES)
    records, same_form = loaded[: args.edits], [r.prompt for r in loaded[args.edits :]]
    if len(records) < args.edits:
        raise ValueError(f"{args.data} has only {len(records)} records, asked for {args.edits}")
    pool = _irrelevant_pool(args.data, data_dir, len(loaded))
    model, tokenizer = models.load(args.model, device=args.device)
    config = make_config(cls, model, args.overrides)
    dataset = Path(args.data).stem if args.data.endswith(".jsonl") else args.data
    out = Path(args.out or _default_out(args, dataset, cls, config, tokenizer))
    out.mkdir(parents=True, exist_ok=True)

    settings = config.to_dict()
    saved = _checkpointed_config(out, cls.method) if args.resume else None
    if saved is not None:  # the run continues as it was configured (as `edit --resume`)
        differ = settings_that_differ(cls, saved, args.overrides)
        if differ:
            raise ValueError(f"--resume with settings that differ from {out}: {'; '.join(differ)}")
        config, settings = cls.config_class.from_dict(saved), saved
    fmt = PromptFormat.create(tokenizer, config.prompt_format)
    mode = cls.variant_of(config)

    def make_editor() -> Editor:
        return cls(model, tokenizer, config, irrelevant_prompts=pool)

    def load_editor(path: Path) -> Editor:
        return cls.from_pretrained(model, tokenizer, path, irrelevant_prompts=pool)

    checkpoint = _checkpointing(args, out, load_editor, settings, fmt.kind)
    pre_edit = None
    if args.pre_edit_from:
        unedited = {"model": args.model, "prompt_format": fmt.kind, "eval_sample": args.eval_sample}
        pre_edit = PreEdit.borrow(Path(args.pre_edit_from), records, unedited)
    result, editor = run_protocol(
        model,
        fmt,
        records,
        make_editor,
        method=cls.method,
        mode=mode,
        dataset=dataset,
        chunk=args.chunk,
        checkpoint=checkpoint,
        eval_sample=args.eval_sample,
        pre_edit=pre_edit,
        decode_batch=args.decode_batch,
        batch=args.batch,
    )
    probe = [r.prompt for r in records[:16]] + [r.loc for r in records[:16] if r.loc]
    result.extra["latency"] = latency_ratio(editor, probe, repeats=args.latency_repeats)
    result.extra["config"] = config.to_dict()
    result.extra["model"] = args.model
    result.extra["device"] = str(model.device)
    result.extra["command"] = "wise-edit " + " ".join(getattr(args, "argv", []) or [])
    result.extra["decode_batch"] = args.decode_batch
    if args.batch:
        result.extra["batch"] = args.batch
    result.extra.update(editor.summary())
    if args.chunk is None:
        result.extra.update(dataset_metrics(args.data, editor, fmt, records))
    routing = routing_scores(editor, records, same_form)
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


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse a count that is not positive before anything loads: a negative --edits
    would slice records off the end (T = -2 ran 4 edits) and 0 scores nothing."""
    for flag, value in (
        ("--edits", args.edits),
        ("--chunk", args.chunk),
        ("--eval-sample", args.eval_sample),
        ("--latency-repeats", args.latency_repeats),
        ("--decode-batch", args.decode_batch),
        ("--batch", args.batch),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")


def _default_out(
    args: argparse.Namespace, dataset: str, cls: type[EditorBase], config: Any, tokenizer: Any
) -> str:
    """runs/DATASET-T<edits>-<prompt format>-<method>[-<mode>] for a run without --out."""
    kind = PromptFormat.create(tokenizer, config.prompt_format).kind
    mode = cls.variant_of(config)
    name = args.method.lower() + (f"-{mode}" if mode else "")
    batch = f"-batch{args.batch}" if args.batch else ""
    return f"runs/{dataset}-T{args.edits}-{kind}-{name}{batch}"


def _checkpointed_config(out: Path, method: str) -> dict[str, Any] | None:
    """The method config a checkpointed run in ``out`` was started with (None: none),
    in today's layout: a run started before WISE's nested config wrote it flat, and its
    protocol file is rewritten in today's layout, so that the resumed run matches it."""
    path = out / "checkpoint" / PROTOCOL_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    config = data.get("settings", {}).get("config")
    if isinstance(config, dict) and method == "WISE" and "memory" not in config:
        config = data["settings"]["config"] = upgrade_config(method, config, version=2)
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return config


def _checkpointing(
    args: argparse.Namespace,
    out: Path,
    load: Callable[[Path], Editor],
    config: dict[str, Any],
    prompt_format: str,
) -> Checkpointing | None:
    """Checkpoints in OUT/checkpoint when asked for (or when resuming); a run that finds
    one there without --resume is refused rather than silently restarted."""
    folder = out / "checkpoint"
    exists = (folder / PROTOCOL_FILE).is_file()
    if exists and not args.resume:
        raise ValueError(f"{folder} holds a checkpointed run: --resume continues it")
    if not (args.resume or args.checkpoint_every):
        return None
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.resume and not exists:
        print(f"{folder} holds no checkpoint yet; starting the run")
    settings = {
        "method": args.method,
        "model": args.model,
        "config": config,
        "prompt_format": prompt_format,
        "eval_sample": args.eval_sample,
    }
    return Checkpointing(folder, args.checkpoint_every or 10, load, settings)


def _irrelevant_pool(dataset: str, data_dir: Path, edited: int = 0) -> list[str] | None:
    """The unrelated prompts the router is trained against: for ZsRE (and a user's JSONL)
    NQ questions and ZsRE questions about other subjects (the edits' own form), for
    CounterFact its held-out tail (what a stream of ``edited`` records leaves of it, and
    ZsRE's pool where it takes any: `load_counterfact_pool`), else the training split of
    the set (as the paper's D_irr). None (the built-in neutral pool) for a JSONL when ZsRE
    is not there."""
    if dataset == "counterfact":
        return load_counterfact_pool(data_dir, edited)
    if dataset == "zsre" or dataset.endswith(".jsonl"):
        try:
            return load_zsre_irrelevant(data_dir) + load_zsre_same_form(data_dir)
        except FileNotFoundError:
            if dataset == "zsre":
                raise
            logger.warning("no ZsRE data in %s: the built-in unrelated pool is used", data_dir)
            return None
    loader = load_hallucination if dataset == "hallucination" else load_temporal
    return [r.prompt for r in loader(data_dir, split="train")]


def dataset_metrics(
    dataset: str, editor: Editor, fmt: PromptFormat, records: list[EditRecord]
) -> dict[str, Any]:
    """The set-specific metrics of the paper: Hallucination's perplexity of the target
    (lower is better) and Temporal's OOD Gen, each edited and pre-edit."""
    model = editor.model
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
        return round(statistics.fmean(fn(model, fmt, p, t) for p, t in pairs), 4)

    edited = mean()
    with editor.disabled():
        pre = mean()
    return {name: {"edited": edited, "pre_edit": pre}}


def routing_scores(
    editor: Editor, records: list[EditRecord], same_form: list[str] | None = None
) -> dict[str, Any] | None:
    """Which prompts reach an edit memory: edit prompts, paraphrases, the locality
    probes ("unrelated") and unedited records' prompts of the same set ("same-form
    unrelated"), and for methods that route by a score against a threshold the scores
    (the paper's Figure 3). None for methods that edit the weights themselves.

    Reaching *some* memory is not answering from the right one: with many memories an
    edit prompt or a paraphrase can be taken by another edit's memory. Where the method
    names the memory holding each edit (`memory_holding`), the share routed to that one
    is reported too ("share_routed_to_own_memory"); the records are edits 0..T-1."""
    if not editor.routes:
        return None
    with_rephrase = [i for i, r in enumerate(records) if r.rephrase]
    groups = {
        "edit prompts": ([r.prompt for r in records], list(range(len(records)))),
        "paraphrases": ([records[i].rephrase for i in with_rephrase], with_rephrase),
        "unrelated": ([r.loc for r in records if r.loc], None),
        "same-form unrelated": (list(same_form or []), None),
    }
    holders = [editor.memory_holding(i) for i in range(len(records))]
    named = all(h is not None for h in holders)
    scores: dict[str, list[float]] = {}
    routed: dict[str, float] = {}
    own: dict[str, float] = {}
    for name, (prompts, edits) in groups.items():
        if not prompts:
            continue
        choice, best = editor.routing_detail(prompts)
        if best is not None:
            scores[name] = best
        routed[name] = sum(c >= 0 for c in choice) / len(choice)
        if named and edits is not None:
            own[name] = sum(c == holders[i] for c, i in zip(choice, edits)) / len(choice)
    thresholds = list(editor.summary().get("thresholds", []))
    summary: dict[str, Any] = {"share_routed_to_side_memory": routed, "thresholds": thresholds}
    if own:
        summary["share_routed_to_own_memory"] = own
    return {"scores": scores, "thresholds": thresholds, "summary": summary}


def plot_routing(routing: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s", path)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {
        "edit prompts": "tab:red",
        "paraphrases": "tab:orange",
        "unrelated": "tab:blue",
        "same-form unrelated": "tab:green",
    }
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


COLUMNS = (
    ("answer EM", "answer_em", ("rel", "gen")),
    ("gen. Loc", "answer_em", ("loc",)),
    ("TF", "teacher_forced", ("rel", "gen", "loc")),
    ("prefix EM", "prefix_em", ("rel", "gen")),
    ("reply contains", "reply_contains", ("rel", "gen")),
)
"""The report's columns, led by what a user sees: (label, metric kind, fields)."""


def _header() -> list[str]:
    names = {"rel": "Rel", "gen": "Gen", "loc": "Loc"}
    return [
        label if label.endswith("Loc") else f"{label} {names[f]}"
        for label, _, fields in COLUMNS
        for f in fields
    ]


def _cells(scores: dict[str, Any]) -> list[str]:
    out = []
    for _, kind, fields in COLUMNS:
        values = scores.get(kind) or {}
        if isinstance(values, Scores):
            values = {"rel": values.rel, "gen": values.gen, "loc": values.loc}
        out += [_fmt(values.get(f)) for f in fields]
    return out


def markdown_table(result: BenchResult, args: argparse.Namespace) -> str:
    lat = result.extra.get("latency", {})
    title = f"{result.method}-{result.mode}" if result.mode else result.method
    header = _header()
    pre = [c if "Loc" not in h else "–" for h, c in zip(header, _cells(result.pre_edit))]
    lines = [
        f"### {title}, {result.dataset}, {result.prompt_format} prompts, T = {result.edits}",
        "",
        "| | " + " | ".join(header) + " |",
        "|---" * (len(header) + 1) + "|",
        "| pre-edit | " + " | ".join(pre) + " |",
        "| edited | " + " | ".join(_cells(result.scores)) + " |",
        "",
        f"- seconds per edit: {result.seconds_per_edit:.2f}; mean steps per edit: "
        f"{result.extra.get('steps_per_edit')}"
        + (f"; side memories: {result.extra['memories']}" if "memories" in result.extra else "")
        + (f"; codebook keys: {result.extra['keys']}" if "keys" in result.extra else ""),
        f"- peak memory: {result.peak_memory_mb:.0f} MB"
        + (f"; device: {result.extra['device']}" if "device" in result.extra else ""),
    ]
    if "saved_kb_per_edit" in result.extra:
        lines.append(
            f"- editor state per edit: {result.extra['saved_kb_per_edit']} KB of saved "
            f"tensors, {result.extra['ram_kb_per_edit']} KB in RAM with its caches"
        )
    if result.extra.get("batch"):
        lines.append(
            f"- edits made {result.extra['batch']} at a time (`--batch`); seconds per edit "
            "are each group's time over its size"
        )
    sample = result.extra.get("eval_sample")
    if sample:
        lines.append(
            f"- scored on a fixed random sample of {sample['records']} of the {result.edits} "
            f"edits (seed {sample['seed']}); all {result.edits} were edited"
        )
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
    routing = result.extra.get("routing", {})
    routed = routing.get("share_routed_to_side_memory", {})
    if routed:
        lines.append(
            "- routed to a side memory: " + ", ".join(f"{k} {v:.2f}" for k, v in routed.items())
        )
    own = routing.get("share_routed_to_own_memory", {})
    if own:
        lines.append(
            "- routed to the memory holding the edit: "
            + ", ".join(f"{k} {v:.2f}" for k, v in own.items())
        )
    return "\n".join(lines) + "\n"


def _scores_of(data: dict[str, Any]) -> dict[str, Any]:
    """The metric kinds of a results.json; runs written before answer EM existed have
    "teacher_forced" and "generated" (today's prefix EM, its Loc a shorter continuation)."""
    if "scores" in data:
        return data["scores"]
    gen = data.get("generated") or {}
    if not isinstance(gen, dict):
        return {"prefix_em": gen}
    return {
        "teacher_forced": data.get("teacher_forced", {}),
        "prefix_em": gen,
        "answer_em": {"loc": gen.get("loc")},
    }


SET_METRICS = {"perplexity": "PPL of the edits ↓", "ood_gen": "OOD Gen"}
"""The paper's set-specific metrics (`dataset_metrics`) and their column names."""


RESULT_FIELDS = {"method": str, "dataset": str, "edits": int, "seconds_per_edit": (int, float)}
"""What `comparison_table` reads of every results.json, and the type each must have."""


def read_results(path: Path) -> dict[str, Any]:
    """A bench run's results.json, checked for what the comparison reads: a file that is
    not one (another program's JSON, a hand-edited one) is a ValueError naming the path
    and the field, not a KeyError deep in the table."""

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a `wise-edit bench` results.json ({why})")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise bad(f"unreadable JSON: {type(err).__name__}") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    for key, kind in RESULT_FIELDS.items():
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise bad(f"{key!r} is missing or not {'text' if kind is str else 'a number'}")
    if not isinstance(data.get("mode") or "", str):
        raise bad("'mode' is not text")
    scores = _scores_of(data)
    if not isinstance(scores, dict):
        raise bad("'scores' is not an object")
    for kind, values in scores.items():
        if values is None:
            continue
        if not isinstance(values, dict) or not all(_number_or_none(v) for v in values.values()):
            raise bad(f"scores {kind!r} is not an object of numbers")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise bad("'extra' is not an object")
    for metric in SET_METRICS:
        value = extra.get(metric)
        if value is not None and not (
            isinstance(value, dict)
            and all(isinstance(value.get(k), (int, float)) for k in ("edited", "pre_edit"))
        ):
            raise bad(f"extra {metric!r} has no numbers 'edited' and 'pre_edit'")
    return data


def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _kb(value: Any) -> str:
    return "–" if value is None or not _number_or_none(value) else f"{value:.1f}"


def comparison_table(runs: list[str]) -> str:
    """One row per bench run (folder or results.json): every metric kind's Rel/Gen/Loc,
    the set's own metric where a run has one (the paper's Tables 3-4: Hallucination's
    perplexity, Temporal's OOD Gen), seconds per edit, the editor's state per edit (saved
    tensors / RAM with its caches, KB) and peak memory, sorted by dataset,
    T, then the order given. WISE without its router (``routing.gate`` false, the paper's
    Table 7) is named so."""
    rows = []
    for order, run in enumerate(runs):
        path = Path(run)
        path = path / "results.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no results.json (is it a `wise-edit bench` folder?)")
        data = read_results(path)
        rows.append((data["dataset"], data["edits"], order, data))
    own = [m for m in SET_METRICS if any(m in r[3].get("extra", {}) for r in rows)]
    header = ["method", "data", "format", "T", *_header()]
    header += [f"{SET_METRICS[m]} (pre-edit)" for m in own]
    header += ["s/edit", "KB/edit saved / RAM", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for dataset, edits, _, data in sorted(rows, key=lambda r: r[:3]):
        name = data["method"] + (f"-{data['mode']}" if data.get("mode") else "")
        routing = data.get("extra", {}).get("config", {}).get("routing", {})
        if isinstance(routing, dict) and routing.get("gate") is False:
            name += " w.o. router"  # the paper's Table 7
        cells = [name, dataset, data.get("prompt_format", "raw"), str(edits)]
        cells += _cells(_scores_of(data))
        for metric in own:
            value = data.get("extra", {}).get(metric)
            cells.append(f"{value['edited']:.2f} ({value['pre_edit']:.2f})" if value else "–")
        cells.append(f"{data['seconds_per_edit']:.2f}")
        extra = data.get("extra", {})
        cells.append(f"{_kb(extra.get('saved_kb_per_edit'))} / {_kb(extra.get('ram_kb_per_edit'))}")
        peak = data.get("peak_memory_mb")
        cells.append(f"{peak:.0f}" if isinstance(peak, (int, float)) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
