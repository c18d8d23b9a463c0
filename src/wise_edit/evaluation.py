"""The evaluation protocol: edit the first T records sequentially, then score the final
model on all T (the paper's Eq. 9), with pre-edit scores of the unedited model beside."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .core.draft import Editor
from .core.persistence import SaveFolder, save_layout
from .core.prompts import PromptFormat
from .data import EditRecord
from .metrics import Decoder

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """Rel / Gen / Loc of one metric kind (None where the records lack the field)."""

    rel: float | None = None
    gen: float | None = None
    loc: float | None = None


@dataclass
class BenchResult:
    """``scores`` / ``pre_edit``: metric kind name (see `kinds_for`) -> its scores."""

    method: str
    mode: str
    edits: int
    dataset: str
    prompt_format: str
    scores: dict[str, Scores]
    pre_edit: dict[str, Scores]
    seconds_per_edit: float
    peak_memory_mb: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


@dataclass(frozen=True)
class MetricKind:
    """One way of scoring: how a prompt's answer is scored (Rel/Gen) and, for kinds that
    have a locality form, what is recorded on a locality probe and how a probe's
    before/after records compare (Loc). Each reads the model through a `Decoder`, so
    kinds scored on the same model state share its greedy decodings."""

    name: str
    answer: Callable[[Decoder, str, str], float]
    probe: Callable[[Decoder, EditRecord], list[int]] | None = None
    same: Callable[[list[int], list[int]], float] | None = None
    # what it decodes, so that a `Decoder` can batch it ahead: the budget of an answer
    # to a target, and of a locality probe (None: it reads no decoding)
    answer_budget: Callable[[PromptFormat, str], int] | None = None
    probe_budget: int | None = None
    # whether it reads teacher-forced predictions (`Decoder.forced`), batched ahead too
    forced: bool = False

    def decodings(
        self, fmt: PromptFormat, records: Sequence[EditRecord], probes: bool, answers: bool = True
    ) -> list[tuple[str, int]]:
        """The (prompt, budget) pairs scoring ``records`` decodes (with ``answers``, their
        prompts' and paraphrases'; with ``probes``, their locality probes')."""
        wanted = []
        if answers and self.answer_budget is not None:
            for r in records:
                budget = self.answer_budget(fmt, r.target)
                wanted += [(p, budget) for p in (r.prompt, r.rephrase) if p]
        if probes and self.probe_budget is not None:
            wanted += [(r.loc, self.probe_budget) for r in _probed(records)]
        return wanted

    def forcings(
        self, records: Sequence[EditRecord], probes: bool, answers: bool = True
    ) -> list[tuple[str, str]]:
        """The (prompt, target) pairs scoring ``records`` feeds teacher-forced."""
        if not self.forced:
            return []
        wanted = []
        if answers:
            wanted += [(p, r.target) for r in records for p in (r.prompt, r.rephrase) if p]
        if probes:
            wanted += [(r.loc, r.loc_ans) for r in _probed(records)]
        return wanted

    def prefetch(
        self,
        decode: Decoder,
        fmt: PromptFormat,
        records: Sequence[EditRecord],
        probes: bool,
        answers: bool = True,
    ) -> None:
        """Batch ahead what scoring ``records`` reads (see `decodings`, `forcings`)."""
        decode.prefetch(self.decodings(fmt, records, probes, answers))
        decode.prefetch_forced(self.forcings(records, probes, answers))


TEACHER_FORCED = MetricKind(
    "teacher_forced",
    lambda d, prompt, target: metrics.forced_accuracy(
        d.forced(prompt, target), d.fmt.target_ids(target)
    ),
    lambda d, r: d.forced(r.loc, r.loc_ans),
    metrics.agreement,
    forced=True,
)
# Locality in generated form: the probe's continuation (ANSWER_NEW_TOKENS, or until the
# model stops) is unchanged token for token, in the format the editor uses.
ANSWER_EM = MetricKind(
    "answer_em",
    lambda d, prompt, target: metrics.answer_match(d.model, d.fmt, prompt, target, decode=d),
    lambda d, r: d(r.loc, metrics.ANSWER_NEW_TOKENS),
    lambda before, after: float(before == after),
    metrics.answer_budget,
    metrics.ANSWER_NEW_TOKENS,
)
# these two read answer EM's decodings (never longer), so they name no budgets
PREFIX_EM = MetricKind(
    "prefix_em",
    lambda d, prompt, target: metrics.prefix_match(d.model, d.fmt, prompt, target, decode=d),
)
REPLY_CONTAINS = MetricKind(
    "reply_contains",
    lambda d, prompt, target: metrics.reply_contains(d.model, d.fmt, prompt, target, decode=d),
)


def kinds_for(fmt: PromptFormat) -> tuple[MetricKind, ...]:
    """The metric kinds a bench reports: reply contains only for chat prompts. Answer EM
    comes first: its decodings are the longest, so the later kinds cut theirs from them."""
    kinds = (ANSWER_EM, TEACHER_FORCED, PREFIX_EM)
    return (*kinds, REPLY_CONTAINS) if fmt.is_chat else kinds


Baseline = dict[str, list[list[int]]]  # kind name -> the unedited model's probe records


def _probed(records: Sequence[EditRecord]) -> list[EditRecord]:
    return [r for r in records if r.loc and r.loc_ans]


def locality_baseline(
    model: nn.Module,
    fmt: PromptFormat,
    records: Sequence[EditRecord],
    decode: Decoder | None = None,
) -> Baseline:
    """The unedited model's record of each locality probe, per metric kind. ``decode``:
    a `Decoder` of this model state to share decodings with (a new one when None)."""
    decode = decode or Decoder(model, fmt)
    probed = _probed(records)
    for kind in kinds_for(fmt):
        if kind.probe is not None:
            kind.prefetch(decode, fmt, probed, probes=True, answers=False)
    return {
        k.name: [k.probe(decode, r) for r in probed] for k in kinds_for(fmt) if k.probe is not None
    }


def score(
    kind: MetricKind,
    model: nn.Module,
    fmt: PromptFormat,
    records: Sequence[EditRecord],
    base: Baseline | None,
    decode: Decoder | None = None,
) -> Scores:
    """Rel on the prompts, Gen on the paraphrases, Loc against the unedited baseline.
    ``decode``: a `Decoder` of this model state shared with the other kinds."""
    decode = decode or Decoder(model, fmt)
    probed = _probed(records)
    loc = None
    if base is not None and probed and kind.probe is not None and kind.same is not None:
        kind.prefetch(decode, fmt, records, probes=True)
        loc = _mean(
            [kind.same(before, kind.probe(decode, r)) for before, r in zip(base[kind.name], probed)]
        )
    else:
        kind.prefetch(decode, fmt, records, probes=False)
    return Scores(
        rel=_mean([kind.answer(decode, r.prompt, r.target) for r in records]),
        gen=_mean([kind.answer(decode, r.rephrase, r.target) for r in records if r.rephrase]),
        loc=loc,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class Checkpointing:
    """A long run that survives being killed: the pre-edit scores are written once to
    ``folder/protocol.json``, the editor to ``folder/editor`` (a locked atomic save) every
    ``every`` edits; ``load`` re-attaches a saved editor (with the run's unrelated pool)."""

    folder: Path
    every: int
    load: Callable[[Path], Editor]
    settings: dict[str, Any] = field(default_factory=dict)  # must match on resume


def run_protocol(
    model: nn.Module,
    fmt: PromptFormat,
    records: Sequence[EditRecord],
    make_editor: Callable[[], Editor],
    *,
    method: str,
    mode: str,
    dataset: str,
    chunk: int | None = None,
    progress: bool = True,
    checkpoint: Checkpointing | None = None,
    eval_sample: int | None = None,
    pre_edit: PreEdit | None = None,
    decode_batch: int = metrics.DECODE_BATCH,
    batch: int | None = None,
) -> tuple[BenchResult, Editor]:
    """Sequential editing then final-model evaluation. With ``chunk``, the records are
    edited and scored ``chunk`` at a time with a rollback (detach) between chunks and the
    scores averaged, as the reference does for small T. ``fmt``: how prompts are written
    (the editors' own format). ``eval_sample``: score a fixed random sample of that many
    records (seeded; the editing always covers all). ``checkpoint``: save as it goes and
    continue a killed run where it stopped. ``pre_edit``: the unedited model's scores
    when already known (`PreEdit.borrow`), else computed. ``decode_batch``: prompts
    decoded together (`Decoder`; 1 decodes each alone). ``batch``: edits made
    together (`edit_many`; None: the method's own). ``progress``: bars over the edits
    and the decodings. Returns the result and the last editor (still attached)."""
    records = list(records)
    if not records:
        raise ValueError("no records to edit")
    if checkpoint is not None and chunk is not None:
        raise ValueError("checkpoints are for one long stream; they do not combine with chunks")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = chunk or len(records)
    groups = [records[i : i + size] for i in range(0, len(records), size)]
    scored = sample_indices(len(records), eval_sample)
    kinds = kinds_for(fmt)
    start = PreEdit.load(checkpoint, records, scored) if checkpoint else None
    if start is None:
        start = pre_edit or PreEdit.compute(
            model, fmt, records, scored, kinds, decode_batch, progress
        )
        if checkpoint is not None:
            start.write(checkpoint, records)
    parts: dict[str, list[tuple[int, Scores]]] = {k.name: [] for k in kinds}
    bar = tqdm(total=len(records), desc=f"{method} edits", unit="edit", disable=not progress)
    chosen = [records[i] for i in scored]
    editor: Editor | None = None
    offset = done = 0
    seconds: list[float] = []
    for group in groups:
        if editor is not None:
            editor.detach()
        editor = editor_for(checkpoint, make_editor, group)
        editor = _edit_group(editor, group, bar, checkpoint, batch)
        seconds += [entry["seconds"] for entry in editor.edit_log]
        picked = [records[i] for i in scored if offset <= i < offset + len(group)]
        part = _slice_baseline(start.base, chosen, done, len(picked))
        decode = Decoder(model, fmt, decode_batch, progress)  # this group's edited model
        for kind in kinds:
            parts[kind.name].append((len(picked), score(kind, model, fmt, picked, part, decode)))
        offset, done = offset + len(group), done + len(picked)
    bar.close()
    assert editor is not None  # records is not empty
    result = BenchResult(
        method=method,
        mode=mode,
        edits=len(records),
        dataset=dataset,
        prompt_format=fmt.kind,
        scores={name: _weighted(p) for name, p in parts.items()},
        pre_edit=start.pre,
        seconds_per_edit=round(statistics.fmean(seconds), 3),
        peak_memory_mb=round(peak_memory_mb(device), 1),
    )
    if eval_sample is not None:
        result.extra["eval_sample"] = {"records": len(scored), "seed": SAMPLE_SEED}
    return result, editor


SAMPLE_SEED = 0  # the evaluation sample of `--eval-sample`, the same for every method


def sample_indices(total: int, sample: int | None) -> list[int]:
    """Indices of the records scored: all, or a fixed random ``sample`` of them (sorted)."""
    if sample is None or sample >= total:
        return list(range(total))
    if sample < 1:
        raise ValueError(f"eval sample must be >= 1, got {sample}")
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    return sorted(torch.randperm(total, generator=gen)[:sample].tolist())


@dataclass
class PreEdit:
    """What a run computes before its first edit: the unedited model's locality probes
    and pre-edit scores on the scored records. They do not depend on the method, so runs
    of several methods on the same records can compute them once (`borrow`)."""

    base: Baseline
    pre: dict[str, Scores]

    @classmethod
    def compute(
        cls,
        model,
        fmt,
        records,
        scored,
        kinds,
        decode_batch=metrics.DECODE_BATCH,  # noqa: ANN001
        progress=True,  # noqa: ANN001
    ) -> PreEdit:
        chosen = [records[i] for i in scored]
        decode = Decoder(model, fmt, decode_batch, progress)  # the unedited model
        base = locality_baseline(model, fmt, chosen, decode)
        return cls(base, {k.name: score(k, model, fmt, chosen, None, decode) for k in kinds})

    def write(self, checkpoint: Checkpointing, records: Sequence[EditRecord]) -> None:
        data = {
            "records_sha256": _records_digest(records),
            "settings": checkpoint.settings,
            "base": self.base,
            "pre_edit": {name: asdict(s) for name, s in self.pre.items()},
        }
        checkpoint.folder.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.folder / "protocol.json.tmp"
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, checkpoint.folder / PROTOCOL_FILE)

    @classmethod
    def load(cls, checkpoint: Checkpointing, records, scored) -> PreEdit | None:  # noqa: ANN001
        path = checkpoint.folder / PROTOCOL_FILE
        if not path.is_file():
            return None
        return cls._read(path, records, checkpoint.settings, "the checkpoint was made", every=True)

    @classmethod
    def borrow(cls, path: Path, records: Sequence[EditRecord], settings: dict[str, Any]) -> PreEdit:
        """The pre-edit part of another checkpointed run (its folder, its checkpoint
        folder or its protocol.json), refused unless it scored the same records with the
        same ``settings`` (model, prompt format, evaluation sample)."""
        for candidate in (path / "checkpoint" / PROTOCOL_FILE, path / PROTOCOL_FILE, path):
            if candidate.is_file():
                return cls._read(candidate, records, settings, "its pre-edit scores were made")
        raise FileNotFoundError(f"{path}: no {PROTOCOL_FILE} of a checkpointed bench run")

    @classmethod
    def _read(
        cls,
        path: Path,
        records: Sequence[EditRecord],
        settings: dict[str, Any],
        made: str,
        every: bool = False,
    ) -> PreEdit:
        """The pre-edit part of a protocol.json made for ``records`` with ``settings``
        (``every``: and no setting of its own beyond them, as a resumed run needs)."""
        data = json.loads(path.read_text())
        if data.get("records_sha256") != _records_digest(records):
            raise ValueError(f"{path}: {made} for other records")
        theirs = data.get("settings", {})
        keys = set(theirs) | set(settings) if every else set(settings)
        differ = _differences(theirs, settings, keys)
        if differ:
            raise ValueError(f"{path}: {made} with other settings: {'; '.join(differ)}")
        pre = {name: Scores(**values) for name, values in data["pre_edit"].items()}
        return cls(data["base"], pre)


PROTOCOL_FILE = "protocol.json"


def _differences(saved: dict[str, Any], now: dict[str, Any], keys: set[str]) -> list[str]:
    """Each setting in ``keys`` that differs, as 'key: saved X, now Y'."""
    return [
        f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}"
        for key in sorted(keys)
        if saved.get(key) != now.get(key)
    ]


def _records_digest(records: Sequence[EditRecord]) -> str:
    text = json.dumps([[r.prompt, r.target, r.rephrase, r.loc, r.loc_ans] for r in records])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def editor_for(
    checkpoint: Checkpointing | None, make_editor: Callable[[], Editor], group: list[EditRecord]
) -> Editor:
    """A fresh editor, or the checkpointed one of a killed run (checked to hold a prefix
    of ``group``)."""
    saved = None if checkpoint is None else checkpoint.folder / "editor"
    if saved is None or save_layout(saved) is None:
        return make_editor()
    editor = checkpoint.load(saved)  # type: ignore[union-attr]
    done = [(e["prompt"], e["target"]) for e in editor.edit_log]
    if done != [(r.prompt, r.target) for r in group[: len(done)]]:
        editor.detach()
        raise ValueError(f"{saved}: the checkpointed edits are not this run's first records")
    return editor


def _edit_group(
    editor: Editor,
    group: list[EditRecord],
    bar: Any,
    checkpoint: Checkpointing | None,
    batch: int | None = None,
) -> Editor:
    """Edit the group's records the editor does not hold yet, checkpointing as it goes;
    ``batch`` edits at a time (`edit_many`; None: the method's own `edit_batch`)."""
    done = editor.num_edits
    bar.update(done)
    with ExitStack() as stack:
        folder = None
        if checkpoint is not None:
            folder = stack.enter_context(SaveFolder(checkpoint.folder / "editor"))
        unsaved = 0
        for part in _batches(group[done:], batch or editor.edit_batch):
            # one update for the part (MEMIT-MASS: the whole group)
            results = editor.edit_many([r.request() for r in part], batch=len(part))
            unsaved += len(part)
            bar.update(len(part))
            bar.set_postfix(s_per_edit=f"{results[-1].seconds:.2f}")
            if folder is not None and checkpoint is not None and unsaved >= checkpoint.every:
                folder.write(editor.snapshot())
                unsaved = 0
        if folder is not None and unsaved:
            folder.write(editor.snapshot())
    return editor


def _batches(records: list[EditRecord], size: int | None) -> list[list[EditRecord]]:
    """``records`` in consecutive batches of ``size`` (None: one batch)."""
    size = size or max(1, len(records))
    return [records[i : i + size] for i in range(0, len(records), size)]


def _slice_baseline(base: Baseline, records: list[EditRecord], start: int, count: int) -> Baseline:
    """The baseline entries of records[start:start+count] (only probed records have one)."""
    first = len(_probed(records[:start]))
    n = len(_probed(records[start : start + count]))
    return {name: values[first : first + n] for name, values in base.items()}


def _weighted(parts: list[tuple[int, Scores]]) -> Scores:
    out = Scores()
    for name in ("rel", "gen", "loc"):
        pairs = [(n, getattr(s, name)) for n, s in parts if getattr(s, name) is not None]
        if pairs:
            total = sum(n for n, _ in pairs)
            setattr(out, name, round(sum(n * v for n, v in pairs) / total, 4))
    return out


@torch.no_grad()
def latency_ratio(editor: Editor, prompts: Sequence[str], repeats: int = 5) -> dict[str, float]:
    """Forward latency of the edited model over the unedited one on the same prompts,
    timed alternately in one run (the unedited side runs with the side memories off)."""
    tokenizer, model = editor.tokenizer, editor.model
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(editor.device)

    def timed() -> float:
        started = time.perf_counter()
        model(**batch)
        return time.perf_counter() - started

    timed()
    edited, plain = [], []
    for _ in range(repeats):
        edited.append(timed())
        with editor.disabled():
            plain.append(timed())
    edited_s, plain_s = statistics.median(edited), statistics.median(plain)
    return {"edited_s": edited_s, "unedited_s": plain_s, "ratio": edited_s / plain_s}
