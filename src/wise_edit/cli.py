"""The `wise-edit` command line: demo, bench, edit, compare, generate, inspect, serve,
train-mend."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import metrics, models
from .core.draft import Editor
from .core.editor import EditorBase
from .core.persistence import (
    SaveFolder,
    SaveLockedError,
    check_target,
    save_layout,
    saved_config,
    saved_method,
)
from .core.prompts import FORMAT_NAMES, PromptFormat
from .core.rows import check_text
from .data import (
    DATASETS,
    default_data_dir,
    load_dataset,
    load_zsre_irrelevant,
    load_zsre_same_form,
    read_jsonl,
)
from .methods import (
    METHODS,
    SERVE_BATCH,
    editor_class,
    load_editor,
    make_config,
    settings_that_differ,
)
from .stream import apply_stream, plan_stream
from .wise import WiseEditor

logger = logging.getLogger("wise_edit.cli")
# errors a user can cause with bad files, saves, flags or records: one line, exit 2
USER_ERRORS = (ValueError, OSError, SaveLockedError, ArithmeticError)


def _add_config_args(parser: argparse.ArgumentParser, method: bool = False) -> None:
    group = parser.add_argument_group("editor settings (default: the model family's preset)")
    if method:
        group.add_argument(
            "--method",
            choices=list(METHODS),
            default=None,
            help="WISE or one of the paper's baselines (default: wise)",
        )
    group.add_argument("--mode", choices=["merge", "retrieve"], default=None, help="WISE only")
    group.add_argument("--layer", type=int, default=None)
    group.add_argument(
        "--format",
        choices=list(FORMAT_NAMES),
        default=None,
        help="prompt_format: raw text or the chat template (default auto: chat when the "
        "tokenizer has a chat template)",
    )
    group.add_argument(
        "--set",
        metavar="FIELD=VALUE",
        action="append",
        default=[],
        help="any field of the method's config, e.g. --set max_steps=40 (JSON values)",
    )


def parse_overrides(args: argparse.Namespace, cls: type[EditorBase]) -> dict[str, Any]:
    """Config fields from ``--set FIELD=VALUE`` (JSON values, else the string), ``--mode``
    and ``--layer``."""
    overrides = _json_settings(args.set, "--set")
    if args.mode is not None:
        if "memory.mode" not in cls.config_class.setting_names():
            raise SystemExit(f"--mode applies to WISE, not {cls.method}")
        overrides["memory.mode"] = args.mode
    if args.layer is not None:
        overrides["layer"] = args.layer
    if args.format is not None:
        overrides["prompt_format"] = args.format
    return overrides


def _config(model: Any, args: argparse.Namespace, cls: type[EditorBase] = WiseEditor) -> Any:
    return make_config(cls, model, parse_overrides(args, cls))


def _pool(data_dir: str | Path) -> list[str] | None:
    """ZsRE's NQ questions and ZsRE questions about other subjects as the unrelated-prompt
    pool; the built-in neutral pool, with a warning naming the path, when not there."""
    try:
        return load_zsre_irrelevant(data_dir) + load_zsre_same_form(data_dir)
    except FileNotFoundError as err:
        logger.warning("%s; training against the built-in unrelated-prompt pool instead", err)
        return None


def _answer(editor: Any, prompt: str, fmt: PromptFormat, max_new_tokens: int = 24) -> str:
    """The model's reply to ``prompt`` in ``fmt``, until it stops (or the budget ends)."""
    ids = metrics.greedy_continuation(editor.model, fmt, prompt, max_new_tokens)
    return " ".join(metrics.reply_text(fmt, ids).split()) or "<ends at once>"


# ---------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    print(f"Loading {args.model} ...")
    model, tokenizer = models.load(args.model, device=args.device)
    records = load_dataset("zsre", data_dir, limit=args.edits)
    unrelated = [
        "The Eiffel Tower is located in the city of",
        "The capital of Japan is",
        "Water freezes at a temperature of",
    ]
    editor = WiseEditor(model, tokenizer, _config(model, args), irrelevant_prompts=_pool(data_dir))
    fmt = editor.format
    print(f"Edits are trained and asked in the {fmt.kind} prompt format.")
    with editor.disabled():
        before = {r.prompt: _answer(editor, r.prompt, fmt) for r in records}
        before_unrelated = {p: _answer(editor, p, fmt) for p in unrelated}
    print("\nBefore editing:")
    for r in records:
        print(f"  Q: {r.prompt}\n     model: {before[r.prompt]!r}   (edit target: {r.target!r})")
    print(f"\nEditing {len(records)} facts, one at a time ...")
    started = time.perf_counter()
    editor.edit_many([(r.prompt, r.target) for r in records], progress=True)
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.0f} s ({elapsed / len(records):.1f} s per edit)\n\nAfter editing:")
    hits = 0
    for r in records:
        answer = _answer(editor, r.prompt, fmt)
        ok = bool(metrics.exact_answer(answer, r.target))
        hits += ok
        para = _answer(editor, r.rephrase, fmt) if r.rephrase else ""
        print(f"  Q: {r.prompt}\n     model: {answer!r}  {'OK' if ok else 'MISS'}")
        if r.rephrase:
            print(f"  paraphrase: {r.rephrase}\n     model: {para!r}")
    print("\nUnrelated prompts (should be unchanged):")
    same = 0
    for p in unrelated:
        now = _answer(editor, p, fmt)
        same += now == before_unrelated[p]
        print(f"  {p!r} -> {now!r}  {'unchanged' if now == before_unrelated[p] else 'CHANGED'}")
    print(
        f"\n{hits}/{len(records)} edits answered exactly (the answer, then stop); "
        f"{same}/{len(unrelated)} unrelated prompts unchanged."
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    args.method = args.method or "wise"
    args.overrides = parse_overrides(args, editor_class(args.method))
    run_bench(args)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Apply a JSONL stream to a save folder: refused before any work when the folder is
    not ours, locked against a second writer, checkpointed, resumable exactly."""
    if args.resume and args.force:
        raise ValueError("--resume continues a save and --force replaces it: pick one")
    file = Path(args.edits)
    lines = read_jsonl(file)  # a malformed line is reported before anything runs
    out = Path(args.out)
    with SaveFolder(out) as folder:
        resume = save_layout(out) is not None
        cls, overrides = _edit_settings(args, out, resume)
        if resume and not args.resume and not args.force:
            raise ValueError(
                f"{out} already holds a {saved_method(out)} save; --resume continues it, "
                "--force replaces it"
            )
        check_target(out, cls.method, replace=args.force)
        if args.resume and not resume:
            print(f"{out} holds no save yet; starting a new one")
        resume = resume and args.resume
        model, tokenizer = models.load(args.model, device=args.device)
        pool = _pool(args.data_dir)
        if resume:
            editor = load_editor(model, tokenizer, out, irrelevant_prompts=pool)
        else:
            config = make_config(cls, model, overrides)
            editor = cls(model, tokenizer, config, irrelevant_prompts=pool)
        plan = plan_stream(editor.edit_log, file, lines, args.reapply_changed)
        if plan.skipped:
            print(plan.describe(file, out))
        # --batch, else the method's own (MEMIT-MASS: the whole stream in one update)
        batch = args.batch or editor.edit_batch or max(1, len(plan.todo))
        applied = apply_stream(editor, folder, file, plan.todo, args.checkpoint_every, batch=batch)
        if not applied and not resume:  # an empty stream still leaves a save to resume
            folder.write(editor.snapshot())
    memories = editor.summary().get("memories")
    where = f" in {memories} side memories" if memories is not None else ""
    print(
        f"applied {applied} edits ({editor.method}); editor has {editor.num_edits} "
        f"edits{where}; saved to {out}"
    )
    return 0


def cmd_retract(args: argparse.Namespace) -> int:
    """Take edits back from a save folder: every id is checked before any is retracted,
    and the save is rewritten once, after the last, so a failure leaves it as it was."""
    out = Path(args.edits)
    if len(set(args.ids)) != len(args.ids):
        raise ValueError(f"an edit id is given twice: {args.ids}")
    with SaveFolder(out) as folder:
        if save_layout(out) is None:
            raise ValueError(f"{out}: no editor save in it (a folder written by `wise-edit edit`)")
        model, tokenizer = models.load(args.model, device=args.device)
        # a retraction may retrain what held the edit, with the pool it was edited against
        editor = load_editor(model, tokenizer, out, irrelevant_prompts=_pool(args.data_dir))
        if not editor.retractable:
            raise ValueError(
                f"{out} holds {editor.method} edits, which cannot be retracted: every edit "
                "changes the same shared weights; re-run the stream without it"
            )
        live = set(editor.live_edits())
        wrong = [i for i in args.ids if i not in live]
        if wrong:
            raise ValueError(
                f"not an applied edit of {out} (it holds {editor.num_edits}, "
                f"{editor.num_edits - len(live)} already retracted): {wrong}"
            )
        for edit_id in args.ids:
            cost = editor.retract(edit_id)
            print(
                f"retracted edit {edit_id} ({editor.edit_log[edit_id]['prompt']!r}): "
                f"{cost['retrained_edits']} edits retrained in {cost['seconds']:.1f} s"
            )
        folder.write(editor.snapshot())
    print(f"{len(live) - len(args.ids)} edits hold; saved to {out}")
    return 0


def _edit_settings(
    args: argparse.Namespace, out: Path, has_save: bool
) -> tuple[type[EditorBase], dict[str, Any]]:
    """The method and config overrides of an `edit` run. Continuing a save, the method
    comes from the save and any setting given that differs from it is an error."""
    if not (has_save and args.resume):
        cls = editor_class(args.method or "wise")
        return cls, parse_overrides(args, cls)
    method, saved = saved_config(out)
    cls = editor_class(method)
    if args.method is not None and editor_class(args.method) is not cls:
        raise ValueError(f"--method {args.method}: {out} holds {method} edits")
    overrides = parse_overrides(args, cls)
    differ = settings_that_differ(cls, saved, overrides)
    if differ:
        raise ValueError(f"--resume with settings that differ from {out}: {'; '.join(differ)}")
    return cls, overrides


def cmd_generate(args: argparse.Namespace) -> int:
    for prompt in args.prompt:
        check_text(prompt, "prompt")
    model, tokenizer = models.load(args.model, device=args.device)
    editor = load_editor(model, tokenizer, args.edits)
    fmt = PromptFormat.create(tokenizer, "chat" if args.chat else "raw")
    for prompt in args.prompt:
        answer = _answer(editor, prompt, fmt, args.max_new_tokens)
        print(f"{prompt} -> {answer!r}   [{_where(editor, prompt)}]")
    return 0


def _where(editor: Editor, prompt: str) -> str:
    if not editor.routes:
        return f"{editor.method}: {editor.route_unit}"
    index = editor.routed([prompt])[0]
    return "unedited" if index < 0 else f"{editor.method}: {editor.route_unit} {index}"


def _editor_save(path: str) -> Path:
    """The editor save at ``path``: the folder itself, or a bench run folder's last
    checkpoint (``RUN/checkpoint/editor``); a ValueError saying what is there otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--save {path}: no such folder")
    for candidate in (folder, folder / "checkpoint" / "editor"):
        if save_layout(candidate) is not None:
            return candidate
    raise ValueError(
        f"--save {path}: no editor save in it (a folder written by `wise-edit edit --out`, "
        "save_pretrained, or a bench run with --checkpoint-every)"
    )


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print (and with --out write as JSONL) what a saved editor answers to the records
    it was given, and count its misses by where each prompt went."""
    from .answers import check_kinds, inspect_answers, miss_summary
    from .evaluation import sample_indices

    kinds = check_kinds(k.strip() for k in args.kinds.split(",") if k.strip())
    save = _editor_save(args.save)
    if args.edits is not None and args.edits < 1:
        raise ValueError(f"--edits must be >= 1, got {args.edits}")
    if args.sample is not None and args.sample < 1:
        raise ValueError(f"--sample must be >= 1, got {args.sample}")
    model, tokenizer = models.load(args.model, device=args.device)
    editor = load_editor(model, tokenizer, save)
    edits = args.edits if args.edits is not None else editor.num_edits
    if edits < 1:
        raise ValueError(f"{save} holds no edits; nothing to inspect")
    records = load_dataset(args.data, args.data_dir, edits)
    if editor.num_edits != len(records):
        print(f"note: the save holds {editor.num_edits} edits; asking {len(records)} records")
    rows = []
    for row in inspect_answers(editor, records, kinds, sample_indices(len(records), args.sample)):
        rows.append(row)
        print(row.line(), flush=True)
    print(miss_summary(rows))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(row.to_json()) + "\n" for row in rows))
        print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .bench import comparison_table

    table = comparison_table(args.runs)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------- parser
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the model with its edits over HTTP; see `wise_edit.serve`."""
    try:
        from .serve.run import ServeSettings, serve, token_from
        from .serve.schema import Limits
    except ImportError as err:
        raise ValueError(f"serve needs the serve extra (wise-edit[serve]): {err}") from None
    cls = editor_class(args.method or "wise")
    settings = ServeSettings(
        model=args.model,
        device=args.device,
        state_dir=Path(args.state),
        method=args.method,
        overrides=parse_overrides(args, cls),
        host=args.host,
        port=args.port,
        token=token_from(args.token),
        checkpoint_every=args.checkpoint_every,
        batch=args.batch,
        limits=Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)}),
    )
    serve(settings)
    return 0


def cmd_train_mend(args: argparse.Namespace) -> int:
    """Train MEND's editor network for a model on MEND's ZsRE train subset and store it
    in the wise-edit cache, where `--method mend` finds it."""
    from .baselines.mend import MendEditor, MendTraining, store
    from .baselines.mend.editor import network_fields
    from .baselines.mend.training import train_and_cache
    from .data import load_zsre_train

    settings = _json_settings(args.train, "--train")
    if args.steps is not None:
        settings["steps"] = args.steps
    training = MendTraining.from_dict(settings)
    records = load_zsre_train(args.data_dir)  # missing data fails before the model loads
    model, tokenizer = models.load(args.model, device=args.device)
    config = make_config(MendEditor, model, parse_overrides(args, MendEditor))
    folder = store.cache_folder(network_fields(model, config, tokenizer))
    if store.read_meta(folder) is not None and not args.force:
        print(f"a trained MEND editor network for this model is in {folder}; --force retrains")
        return 0
    print(f"training MEND on {len(records)} records ({training.steps} edits) ...")
    folder, meta = train_and_cache(
        model, tokenizer, records, config, training, source=str(args.data_dir), progress=True
    )
    seconds = meta["seconds"]
    print(
        f"trained in {seconds:.0f} s ({seconds / training.steps:.2f} s per training edit, "
        f"{meta['torch_threads']} torch threads); alpha {meta['edit_lr']:.3g}; saved to {folder}"
    )
    for when in ("holdout_before", "holdout_after"):
        if when in meta:
            print(
                f"  {meta['holdout']} held-out edits, {when.split('_')[1]} training: {meta[when]}"
            )
    return 0


def _json_settings(items: list[str], flag: str) -> dict[str, Any]:
    """FIELD=VALUE items (JSON values, else the string) as a dict."""
    settings: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} expects FIELD=VALUE, got {item!r}")
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings


def _limit_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of `serve.schema.Limits`, which become `serve`'s request-limit flags;
    none without the serve extra (then `serve` itself says what is missing)."""
    try:
        from .serve.schema import Limits
    except ImportError:
        return ()
    return dataclasses.fields(Limits)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help=f"bundled name ({', '.join(models.BUNDLED)}) or a local HF folder",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help='where the model runs: "auto" (a CUDA GPU when torch sees one, else the CPU), '
        '"cpu", "cuda", "cuda:1", ...',
    )


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="edit a few ZsRE facts into the bundled SmolLM2 and show answers before and after",
    )
    _add_model_args(demo)
    demo.add_argument("--edits", type=int, default=4)
    demo.add_argument("--data-dir", default=str(default_data_dir()))
    _add_config_args(demo)
    demo.set_defaults(func=cmd_demo)


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="sequential editing benchmark: Rel/Gen/Loc, "
        "teacher-forced and generated, speed and memory",
    )
    _add_model_args(bench)
    bench.add_argument(
        "--data",
        default="zsre",
        help=f"{', '.join(DATASETS)}, or a JSONL file of edits (prompt, target, optional "
        "rephrase, loc, loc_ans)",
    )
    bench.add_argument("--data-dir", default=str(default_data_dir()))
    bench.add_argument("--edits", type=int, default=10, help="T: records edited in sequence")
    bench.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="edit and score CHUNK records at a time, rolling back in between",
    )
    bench.add_argument("--out", default=None, help="output folder (default runs/<data>-T-mode)")
    bench.add_argument("--latency-repeats", type=int, default=5)
    bench.add_argument(
        "--eval-sample",
        type=int,
        default=None,
        metavar="K",
        help="score a fixed random sample of K of the T edits (seeded; all T are edited)",
    )
    bench.add_argument(
        "--decode-batch",
        type=int,
        default=metrics.DECODE_BATCH,
        metavar="B",
        help="prompts of one token length decoded (and teacher-forced) together when "
        f"scoring (default {metrics.DECODE_BATCH}; 1: each prompt alone)",
    )
    bench.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="save the run to OUT/checkpoint every N edits, so a killed run can --resume",
    )
    bench.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in OUT/checkpoint with the config it started with "
        "(same records; a --set or flag given again must agree with it)",
    )
    bench.add_argument(
        "--pre-edit-from",
        default=None,
        metavar="RUN",
        help="take the unedited model's scores from another checkpointed bench run's folder "
        "(same data, T, model, format and --eval-sample; any method) instead of computing "
        "them again",
    )
    _add_batch(bench)
    _add_config_args(bench, method=True)
    bench.set_defaults(func=cmd_bench)


def _add_edit(sub: Any) -> None:
    edit = sub.add_parser("edit", help="apply a JSONL stream of edits and save the editor")
    _add_model_args(edit)
    edit.add_argument("--edits", required=True, help='JSONL: {"prompt": ..., "target": ...}')
    edit.add_argument("--out", required=True, help="folder to save the edits to")
    edit.add_argument(
        "--resume",
        action="store_true",
        help="continue the editor saved in --out: records already applied are skipped",
    )
    edit.add_argument(
        "--force", action="store_true", help="replace an existing save in --out (never other files)"
    )
    edit.add_argument(
        "--checkpoint-every",
        type=int,
        default=1,
        metavar="N",
        help="save to --out after every N edits (default 1: a kill loses no finished edit; "
        "raise it for long streams with many side memories), and always at the end",
    )
    edit.add_argument(
        "--reapply-changed",
        action="store_true",
        help="with --resume: apply records that changed since they were applied as new edits",
    )
    edit.add_argument(
        "--data-dir",
        default=str(default_data_dir()),
        help="for the unrelated-prompt pool (zsre_loc_1k); built-in when absent",
    )
    _add_batch(edit)
    _add_config_args(edit, method=True)
    edit.set_defaults(func=cmd_edit)


def _add_batch(parser: Any) -> None:
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="K",
        help="edit K records at a time, each group one update: WISE trains a group in one "
        "optimisation, each edit stopping where it would alone (needs side memories of one "
        "edit each, as in the defaults); MEMIT and AlphaEdit solve for a group at once "
        "(default: the method's own, 1 but for MEMIT-MASS)",
    )


def _add_compare(sub: Any) -> None:
    compare = sub.add_parser(
        "compare", help="one markdown table from several `wise-edit bench` output folders"
    )
    compare.add_argument("runs", nargs="+", help="folders (or results.json files) of bench runs")
    compare.add_argument("--out", default=None, help="also write the table to this file")
    compare.set_defaults(func=cmd_compare)


def _add_retract(sub: Any) -> None:
    retract = sub.add_parser(
        "retract",
        help="take edits back from a save folder",
        description="Take edits back from a save written by `wise-edit edit`: afterwards the "
        "model answers those prompts as if they had never been edited, and every other edit "
        "holds. Ids are the edits' indices in the save's log: the order they were applied, "
        "from 0 (the edit_log of the save's editor_state.json). "
        "WISE and GRACE edits can be retracted; methods that change shared weights cannot.",
    )
    _add_model_args(retract)
    retract.add_argument("--edits", required=True, help="folder written by `wise-edit edit`")
    retract.add_argument(
        "--data-dir", default=str(default_data_dir()), help="where the unrelated pool is read"
    )
    retract.add_argument("ids", nargs="+", type=int, metavar="ID", help="edit ids to retract")
    retract.set_defaults(func=cmd_retract)


def _add_generate(sub: Any) -> None:
    gen = sub.add_parser("generate", help="greedy answers of a model with saved edits")
    _add_model_args(gen)
    gen.add_argument("--edits", required=True, help="folder written by `wise-edit edit`")
    gen.add_argument("--max-new-tokens", type=int, default=24)
    gen.add_argument(
        "--chat",
        action="store_true",
        help="ask in the tokenizer's chat template (user turn) and print the reply",
    )
    gen.add_argument("prompt", nargs="+")
    gen.set_defaults(func=cmd_generate)


def _add_inspect(sub: Any) -> None:
    ins = sub.add_parser(
        "inspect",
        help="what a saved editor answers to each edited record, and where each miss went",
        description="Ask a saved editor each edited record's prompt and paraphrase (and with "
        "--kinds locality its locality probe), print its greedy answer (as answer EM scores "
        "it), whether it is right and which edit memory answered, then count the misses by "
        "cause: routed to no memory, to another edit's memory, or to its own memory with a "
        "wrong answer. Edit i of the save must be record i of --data. For reading a bench "
        "run's misses; the scores are `wise-edit bench`'s.",
    )
    _add_model_args(ins)
    ins.add_argument(
        "--save",
        required=True,
        help="an editor save (`wise-edit edit --out`, save_pretrained) or a bench run folder "
        "with a checkpoint (its checkpoint/editor)",
    )
    ins.add_argument(
        "--data",
        default="zsre",
        help=f"the records the save was edited with: {', '.join(DATASETS)} or a JSONL file",
    )
    ins.add_argument("--data-dir", default=str(default_data_dir()))
    ins.add_argument(
        "--edits",
        type=int,
        default=None,
        metavar="N",
        help="ask the first N records (default: as many as the save holds edits)",
    )
    ins.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="K",
        help="ask only the K records that `bench --eval-sample K` scores (seeded)",
    )
    ins.add_argument(
        "--kinds",
        default="prompt,rephrase",
        help="comma-separated, of prompt, rephrase, locality (a locality probe is right when "
        "its answer is the unedited model's); default prompt,rephrase",
    )
    ins.add_argument(
        "--out", default=None, help="also write one JSON object per record to this file"
    )
    ins.set_defaults(func=cmd_inspect)


def _add_serve(sub: Any) -> None:
    srv = sub.add_parser("serve", help="serve the edited model over HTTP while edits stream in")
    _add_model_args(srv)
    srv.add_argument("--state", required=True, help="edit log and checkpoints (made if absent)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument(
        "--token", default=None, help="bearer token for writes (default: $WISE_EDIT_TOKEN)"
    )
    srv.add_argument("--checkpoint-every", type=int, default=10, help="applied edits per save")
    srv.add_argument(
        "--batch",
        type=int,
        default=SERVE_BATCH,
        metavar="K",
        help=f"queued edits made together, up to K (default {SERVE_BATCH}), where the method "
        "can (see `edit --batch`); 1: one at a time",
    )
    limits = srv.add_argument_group("request limits (over them: a 4xx naming the field)")
    for f in _limit_fields():
        limits.add_argument(
            "--" + f.name.replace("_", "-"), type=int, default=f.default, help=f.metadata["help"]
        )
    _add_config_args(srv, method=True)
    srv.set_defaults(func=cmd_serve)


def _add_train_mend(sub: Any) -> None:
    train = sub.add_parser(
        "train-mend",
        help="train MEND's editor network for a model (once; `--method mend` then uses it)",
    )
    _add_model_args(train)
    train.add_argument("--data-dir", default=str(default_data_dir()))
    train.add_argument(
        "--steps", type=int, default=None, help="training edits (default: MendTraining.steps)"
    )
    train.add_argument(
        "--train",
        metavar="FIELD=VALUE",
        action="append",
        default=[],
        help="any field of MendTraining, e.g. --train lr=1e-5 (JSON values)",
    )
    train.add_argument("--force", action="store_true", help="retrain a network already cached")
    _add_config_args(train)
    train.set_defaults(func=cmd_train_mend)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wise-edit",
        description="Lifelong knowledge editing of Hugging Face causal LMs with WISE.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log editing details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    _add_edit(sub)
    _add_retract(sub)
    _add_compare(sub)
    _add_generate(sub)
    _add_inspect(sub)
    _add_serve(sub)
    _add_train_mend(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except USER_ERRORS as err:  # anything else is a bug and keeps its traceback
        print(f"wise-edit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wise-edit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
