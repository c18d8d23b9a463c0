"""The edit service: one editor, its durable log, one worker thread that applies edits
and retractions in arrival order, checkpoints, and generation for any number of
concurrent requests.

State directory: ``edits.sqlite`` (the log, `EditLog`) and ``checkpoint/`` (an editor
save, written with the locked atomic `SaveFolder`), and nothing else: a folder holding
files wise-edit did not write is refused (`check_state_dir`), since a checkpoint swap
would delete them. On start the checkpoint is loaded and every op after it is applied
again; an op whose effect the checkpoint already holds (a crash between the save and the
log's note of it) is only marked done, so every accepted edit is applied exactly once. A
checkpoint that lacks edits the log says it holds (deleted, or an older one put back) is
rebuilt from the log; one that cannot be (it holds edits the log never accepted) is
refused.

Faults do not stop the worker: a failed checkpoint or log write (a full disk, the state
folder removed) is retried with backoff while `problem` reports it, and writes are
refused (`Unavailable`) until edits can be made durable again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer

from ..core.editor import EditorBase
from ..core.persistence import (
    CONFIG_FILE,
    LEGACY_FILES,
    STATE_FILE,
    TENSOR_FILE,
    ForeignFolderError,
    SaveFolder,
    save_layout,
)
from ..core.rows import context_limit
from .log import EditLog, Op

logger = logging.getLogger(__name__)

LOG_FILE = "edits.sqlite"
CHECKPOINT_DIR = "checkpoint"
EDIT_ERRORS = (ValueError, TypeError, ArithmeticError, RuntimeError)
# what a full disk, a removed folder or a broken file raise from the log or a save
STORAGE_ERRORS = (OSError, sqlite3.Error)
# the longest wait between two tries of a failing checkpoint or log write
MAX_BACKOFF_S = 30.0
# the files of a save, in every layout (what `check_state_dir` finds in a checkpoint)
_SAVE_FILES = frozenset(
    {CONFIG_FILE, STATE_FILE, TENSOR_FILE, *(n for files in LEGACY_FILES.values() for n in files)}
)


class Unavailable(RuntimeError):
    """Writes are refused because edits cannot be made durable now: ``status`` 507 when
    the disk is full, else 503 (the HTTP layer answers with it)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class Unanswerable(ValueError):
    """A question the model cannot answer as asked (``param`` names the request field),
    found before any generation starts."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def storage_status(err: BaseException) -> int:
    """507 for a full disk (SQLite's SQLITE_FULL, ENOSPC, EDQUOT), else 503."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507
    code = getattr(err, "sqlite_errorcode", None)
    return 507 if code == getattr(sqlite3, "SQLITE_FULL", 13) else 503


def check_state_dir(path: str | Path) -> None:
    """Refuse a state folder, or a ``checkpoint/`` in it, holding anything wise-edit did
    not write: a checkpoint swap replaces the whole ``checkpoint/`` folder, so a user's
    files there would be deleted without a word."""
    state = Path(path)
    if not state.exists():
        return
    if not state.is_dir():
        raise ForeignFolderError(f"--state {state} is a file, not a folder")
    ours = {LOG_FILE, *(LOG_FILE + s for s in ("-wal", "-shm", "-journal")), CHECKPOINT_DIR}
    ours |= {f".{CHECKPOINT_DIR}.lock", f".{CHECKPOINT_DIR}.lock.owner"}
    sides = (f".{CHECKPOINT_DIR}.old-", f".{CHECKPOINT_DIR}.tmp-")
    foreign = [
        p.name for p in state.iterdir() if p.name not in ours and not p.name.startswith(sides)
    ]
    checkpoint = state / CHECKPOINT_DIR
    if checkpoint.is_dir():
        foreign += [f"{CHECKPOINT_DIR}/{p.name}" for p in checkpoint.iterdir()
                    if p.name not in _SAVE_FILES]  # fmt: skip
    elif checkpoint.exists():
        foreign.append(CHECKPOINT_DIR)
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ForeignFolderError(
            f"--state {state} holds files wise-edit did not create ({shown}); refusing to "
            "use it, as checkpoints would delete them (choose a new or empty folder)"
        )


@dataclass(frozen=True)
class Completion:
    """One generated answer and where it came from."""

    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    memory: int | None  # the edit memory that answered; None: the unedited model


@dataclass(frozen=True)
class Question:
    """One generation request as the service answers it (the HTTP layer has already
    checked every field against its limits)."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    stop: tuple[str, ...] = ()  # the answer is cut before the first of these
    unedited: bool = False  # answer with every edit switched off
    special_tokens: bool = True  # False: the prompt already has them (chat template)


@dataclass
class Latencies:
    """Recent request latencies, for /metrics."""

    seconds: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    served: int = 0

    def add(self, value: float) -> None:
        self.seconds.append(value)
        self.served += 1

    def summary(self) -> dict[str, Any]:
        values = sorted(self.seconds)
        return {
            "served": self.served,
            "p50_s": _quantile(values, 0.5),
            "p95_s": _quantile(values, 0.95),
        }


def _quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (nearest rank), None when empty."""
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


class EditService:
    """Owns the editor while serving: ``editor`` is new (first start) or loaded from the
    state directory's checkpoint (`checkpoint_path`); `start` reconciles the log with it
    and starts the worker, `stop` ends it with a last checkpoint.

    ``folder`` and ``log``, when given, are the checkpoint folder already held (locked,
    and recovered before the checkpoint was loaded: `serve.run.build_service`) and the
    log already opened; else `start` takes them."""

    def __init__(
        self,
        state_dir: str | Path,
        editor: EditorBase,
        checkpoint_every: int = 10,
        folder: SaveFolder | None = None,
        log: EditLog | None = None,
        batch: int = 1,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch = batch if batch == 1 or _can_batch(editor) else 1
        self.state_dir = Path(state_dir)
        self.editor = editor
        self.checkpoint_every = checkpoint_every
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = log or EditLog(self.state_dir / LOG_FILE)
        self._log_identity = _identity(self.log.path)
        self.latency = Latencies()
        self._held = folder is not None
        self._folder = folder or SaveFolder(self.state_dir / CHECKPOINT_DIR)
        self._fault: Unavailable | None = None  # the last failure, until a step succeeds
        self._backoff = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._since_checkpoint = 0
        self._index: dict[int, int] = {}  # service edit id -> index in the editor's log

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def checkpoint_path(state_dir: str | Path) -> Path | None:
        """The checkpoint to resume from, if the state directory holds one."""
        path = Path(state_dir) / CHECKPOINT_DIR
        return path if save_layout(path) is not None else None

    def start(self) -> None:
        """Lock the state directory, reconcile the log with the checkpoint, start the
        worker."""
        if not self._held:
            self._folder.__enter__()  # held while serving: a second server fails fast
            self._held = True
        try:
            self._reconcile()
            if save_layout(self._folder.path) is None:
                self._checkpoint()  # the config is in the state directory from the start
        except BaseException:
            self._folder.__exit__(None, None, None)
            self._held = False
            raise
        self._worker = threading.Thread(target=self._run, name="wise-edit-worker", daemon=True)
        self._worker.start()

    def stop(self, checkpoint: bool = True) -> None:
        """End the worker, write a last checkpoint (a failure is logged: the log keeps
        every edit, and the next start applies them again), release the folder."""
        self._stop.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join()
        if checkpoint and self._since_checkpoint:
            try:
                self._checkpoint()
            except STORAGE_ERRORS as err:
                logger.error("last checkpoint failed (%s); the log keeps the edits", err)
        if self._held:
            self._folder.__exit__(None, None, None)
            self._held = False
        self.log.close()

    def _reconcile(self) -> None:
        """Ops after the checkpoint are redone; those the checkpoint already reflects are
        marked done with the status the checkpoint gives them. A checkpoint missing edits
        the log says it holds is rebuilt: every op is done again in order, those the
        checkpoint holds only marked done (possible when it holds a prefix of them); a
        checkpoint that is no prefix of the log is refused rather than served half."""
        for index, entry in enumerate(self.editor.edit_log):
            service_id = (entry.get("meta") or {}).get("id")
            if isinstance(service_id, int):
                self._index[service_id] = index
        where = self._folder.path
        unknown = sorted(i for i in self._index if self.log.get(i) is None)
        if unknown:
            raise ValueError(
                f"{where} holds edits {unknown[:5]} that {self.log.path.name} never "
                "accepted (was the log replaced?); refusing to serve them half"
            )
        missing = [i for i in self.log.checkpointed_edits() if i not in self._index]
        redo_from = self.log.checkpoint_seq()
        if missing:
            if any(held > missing[0] for held in self._index):
                raise ValueError(
                    f"{where} lacks edits {missing[:5]} the log says it holds, and holds "
                    "later ones: refusing to serve it half (move it away to rebuild it "
                    "from the log)"
                )
            logger.warning(
                "%s holds %d of the %d edits the log says it holds; applying the other %d "
                "again from the log",
                where,
                len(self._index),
                len(self._index) + len(missing),
                len(missing),
            )
            redo_from = 0
        self.log.redo_after(redo_from)

    # ------------------------------------------------------------------ requests
    def submit(self, records: list[dict[str, Any]]) -> list[int]:
        """Log edits durably; the worker applies them in order. `Unavailable` while they
        cannot be made durable (a failing checkpoint, a full disk, the state folder
        gone)."""
        self._check_writable()
        try:
            ids = self.log.add_edits(records)
        except STORAGE_ERRORS as err:
            raise Unavailable(
                f"the edit log could not be written: {err}", storage_status(err)
            ) from err
        self._wake.set()
        return ids

    def retract(self, edit_id: int) -> None:
        self._check_writable()
        try:
            self.log.request_retraction(edit_id)
        except STORAGE_ERRORS as err:
            raise Unavailable(
                f"the edit log could not be written: {err}", storage_status(err)
            ) from err
        self._wake.set()

    def problem(self) -> Unavailable | None:
        """Why edits cannot be made durable now (for /health and writes), or None."""
        return self._gone() or self._fault

    def _gone(self) -> Unavailable | None:
        """The log file removed or replaced under us: what is written now goes into an
        unlinked file, lost at the next start."""
        if _identity(self.log.path) == self._log_identity:
            return None
        return Unavailable(
            f"the state folder {self.state_dir} was removed or replaced while serving; "
            "restart the server"
        )

    def _check_writable(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise Unavailable(f"edits are not accepted now: {problem.message}", problem.status)

    def wait_idle(self, timeout: float) -> bool:
        """Whether every logged op was done within ``timeout`` seconds (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.log.next_op() is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        """Steps until stopped. A step that fails (a checkpoint or log write on a full
        disk, a folder gone) leaves its op in the log and is tried again after a backoff
        doubling up to `MAX_BACKOFF_S`; `problem` reports the failure meanwhile."""
        while not self._stop.is_set():
            try:
                worked = self._step()
            except Exception as err:  # noqa: BLE001 - the worker outlives every fault
                self._failed(err)
                self._stop.wait(self._backoff)
                continue
            if self._fault is not None:
                logger.warning("recovered: %s", self._fault.message)
            self._fault, self._backoff = None, 0.0
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    def _step(self) -> bool:
        """A due checkpoint, else the next op; whether there was an op."""
        gone = self._gone()
        if gone is not None:
            raise gone
        if self._since_checkpoint >= self.checkpoint_every:
            self._checkpoint()
        op = self.log.next_op()
        if op is None:
            return False
        group = self._pending_edits(op)
        if len(group) > 1:
            self._apply_together(group)
        else:
            self._do(op)
        if self._since_checkpoint >= self.checkpoint_every:
            self._checkpoint()
        return True

    def _failed(self, err: Exception) -> None:
        self._backoff = min(MAX_BACKOFF_S, max(0.5, 2 * self._backoff))
        if isinstance(err, Unavailable):
            fault = err
        else:
            what = (
                "writing the edit log" if isinstance(err, sqlite3.Error)
                else "checkpoint" if isinstance(err, OSError)
                else "edit worker"
            )  # fmt: skip
            fault = Unavailable(f"{what} failed: {err}", storage_status(err))
        logger.error("%s; trying again in %.1f s", fault.message, self._backoff)
        self._fault = fault

    def _do(self, op: Op) -> None:
        edit = self.log.get(op.edit_id) or {}
        if op.kind == "edit":
            self._apply(op, edit)
        else:
            self._retract(op, edit)

    def _pending_edits(self, op: Op) -> list[Op]:
        """``op`` and the edits queued right after it, up to `batch`: made together."""
        if op.kind != "edit" or self.batch == 1 or op.edit_id in self._index:
            return [op]
        group = []
        for queued in self.log.next_ops(self.batch):
            if queued.kind != "edit" or queued.edit_id in self._index:
                break
            group.append(queued)
        return group if group and group[0] == op else [op]

    def _apply_together(self, ops: list[Op]) -> None:
        """Edits trained in one optimisation (`edit_many`); if the group fails, each is
        made alone, so that one bad edit fails by itself."""
        edits = [self.log.get(op.edit_id) or {} for op in ops]
        try:
            records = [_record(edit) for edit in edits]
            metas = [_meta(op, edit) for op, edit in zip(ops, edits)]
            results = self.editor.edit_many(records, batch=len(records), metas=metas)
        except Exception as err:  # noqa: BLE001 - retried one by one, which reports it
            logger.info("%d edits failed together (%s): making them one at a time", len(ops), err)
            for op, edit in zip(ops, edits):
                self._apply(op, edit)
            return
        for op, result in zip(ops, results):
            self._index[op.edit_id] = result.index
            self._since_checkpoint += 1
            self.log.finish(
                op, "applied", memory=result.memory, steps=result.steps, seconds=result.seconds
            )

    def _apply(self, op: Op, edit: dict[str, Any]) -> None:
        if op.edit_id in self._index:  # the checkpoint (or a try whose note failed) holds it
            entry = self.editor.edit_log[self._index[op.edit_id]]
            self.log.finish(op, "retracted" if entry.get("retracted") else "applied")
            return
        try:
            result = self.editor.edit(
                edit["prompt"], edit["target"], meta=_meta(op, edit), subject=edit.get("subject")
            )
        except Exception as err:  # noqa: BLE001 - a poison edit must not block the log
            if not isinstance(err, EDIT_ERRORS):
                logger.exception("edit %d failed unexpectedly", op.edit_id)
            self.log.finish(op, "failed", error=str(err))
            return
        self._index[op.edit_id] = result.index
        self._since_checkpoint += 1
        self.log.finish(
            op, "applied", memory=result.memory, steps=result.steps, seconds=result.seconds
        )

    def _retract(self, op: Op, edit: dict[str, Any]) -> None:
        index = self._index.get(op.edit_id)
        if index is None:  # its edit failed: nothing to take back
            self.log.finish(op, edit.get("status", "failed"))
            return
        if not self.editor.edit_log[index].get("retracted"):
            try:
                self.editor.retract(index)
            except Exception as err:  # noqa: BLE001 - as for an edit
                if not isinstance(err, (*EDIT_ERRORS, NotImplementedError)):
                    logger.exception("retraction of %d failed unexpectedly", op.edit_id)
                self.log.finish(op, "applied", error=f"retraction failed: {err}")
                return
            self._since_checkpoint += 1
        self.log.finish(op, "retracted")

    def _checkpoint(self) -> None:
        """Save the editor (locked, written beside the old save and swapped in), then
        note in the log which op it reflects."""
        seq = self.log.last_done_seq()
        self._folder.write(self.editor.snapshot())
        self.log.set_checkpoint_seq(seq)
        self._since_checkpoint = 0
        logger.info("checkpoint after op %d", seq)

    # ------------------------------------------------------------------ generation
    def complete(self, question: Question) -> Completion:
        """Generate an answer with the edits committed now."""
        started = time.perf_counter()
        pieces = list(self.stream(question))
        text = "".join(p for p in pieces[:-1] if isinstance(p, str))
        done = pieces[-1]
        assert isinstance(done, Completion)
        self.latency.add(time.perf_counter() - started)
        return Completion(
            text, done.finish_reason, done.prompt_tokens, done.completion_tokens, done.memory
        )

    def stream(self, question: Question) -> Iterator[str | Completion]:
        """Text pieces as they are generated, then a `Completion` (empty text) with the
        finish reason, token counts and the memory that answered. Text is cut before the
        first stop string. A prompt plus ``max_tokens`` beyond the model's context is
        `Unanswerable` here, before the first piece (a model with a hard context, such as
        GPT-2's position table, would fail mid-generation)."""
        q = question
        tokenizer = self.editor.tokenizer
        batch = tokenizer([q.prompt], return_tensors="pt", add_special_tokens=q.special_tokens)
        limit = context_limit(self.editor.model.config)
        length = int(batch["input_ids"].shape[1])
        if limit is not None and length >= limit:
            raise Unanswerable(
                f"the prompt is {length} tokens; the model's context is {limit}", "prompt"
            )
        if limit is not None and length + q.max_tokens > limit:
            raise Unanswerable(
                f"the prompt ({length} tokens) plus max_tokens ({q.max_tokens}) is over the "
                f"model's context of {limit} tokens; ask for at most {limit - length}",
                "max_tokens",
            )
        return self._stream(q, batch)

    def _stream(self, q: Question, batch: dict[str, torch.Tensor]) -> Iterator[str | Completion]:
        editor, tokenizer = self.editor, self.editor.tokenizer
        batch = {k: v.to(editor.device) for k, v in batch.items()}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out: dict[str, Any] = {}
        thread = threading.Thread(
            target=self._generate,
            args=(batch, q, streamer, out),
            daemon=True,
        )
        thread.start()
        text, sent, stopped = "", 0, False
        for piece in streamer:
            if stopped:
                continue
            text += piece
            cut = _cut(text, q.stop)
            stopped = cut is not None
            upto = len(text) if cut is None else cut
            safe = upto if stopped else max(sent, upto - max((len(s) for s in q.stop), default=0))
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        thread.join()
        if "error" in out:
            raise out["error"]
        cut = _cut(text, q.stop)
        end = len(text) if cut is None else cut
        if end > sent:
            yield text[sent:end]
        new = out["tokens"]
        eos = tokenizer.eos_token_id
        ended = cut is not None or (len(new) < q.max_tokens) or (bool(new) and new[-1] == eos)
        yield Completion(
            "",
            "stop" if ended else "length",
            int(batch["input_ids"].shape[1]),
            len(new),
            None if q.unedited else self._answered_by(q.prompt, out["decision"]),
        )

    def _generate(
        self,
        batch: dict[str, torch.Tensor],
        q: Question,
        streamer: TextIteratorStreamer,
        out: dict[str, Any],
    ) -> None:
        """Runs in its own thread (the streamer is read in the caller's)."""
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": q.temperature} if q.temperature > 0 else {}
        )
        if q.stop:
            sampling.update(stop_strings=list(q.stop), tokenizer=self.editor.tokenizer)
        try:
            edits_off = self.editor.disabled() if q.unedited else contextlib.nullcontext()
            with torch.no_grad(), edits_off:
                ids = self.editor.generate(
                    **batch, max_new_tokens=q.max_tokens, streamer=streamer, **sampling
                )
            out["tokens"] = ids[0, batch["input_ids"].shape[1] :].tolist()
            out["decision"] = None if q.unedited else self.editor.last_decision()
        except Exception as err:  # handed to the request thread, which raises it
            out["error"] = err
            streamer.end()

    def _answered_by(self, prompt: str, decision: list[int] | None) -> int | None:
        """The edit memory that answered (None: the unedited model). ``decision`` is the
        one the generation itself held, taken at the prompt under the same read lock (an
        edit committed meanwhile cannot change it); methods that decide anew at every
        token (GRACE) hold none, and are asked again for the prompt."""
        if not self.editor.routes:
            return 0 if self.editor.num_edits else None
        index = self.editor.routed([prompt])[0] if decision is None else decision[0]
        return None if index < 0 else index

    # ------------------------------------------------------------------ reports
    def metrics(self) -> dict[str, Any]:
        editor = self.editor
        summary = editor.summary()
        return {
            "edits": self.log.counts(),
            "editor": {
                "method": editor.method,
                "edits_in_log": editor.num_edits,
                "live_edits": len(editor.live_edits()),
                "memories": summary.get("memories"),
                "route_unit": editor.route_unit,
                "saved_kb_per_edit": summary.get("saved_kb_per_edit"),
                "ram_kb_per_edit": summary.get("ram_kb_per_edit"),
            },
            "latency": self.latency.summary(),
            "checkpoint_seq": self.log.checkpoint_seq(),
        }


def _can_batch(editor: EditorBase) -> bool:
    try:
        editor._check_batch()
    except ValueError as err:
        logger.info("edits are made one at a time: %s", err)
        return False
    return True


def _record(edit: dict[str, Any]) -> dict[str, Any]:
    record = {"prompt": edit["prompt"], "target": edit["target"]}
    return record if edit.get("subject") is None else {**record, "subject": edit["subject"]}


def _meta(op: Op, edit: dict[str, Any]) -> dict[str, Any]:
    return {"id": op.edit_id, **({"rephrase": edit["rephrase"]} if "rephrase" in edit else {})}


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's device and inode (None once it is gone): a log file removed or
    replaced under a running service has another."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _cut(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None
