"""The evaluation protocol: edit the first T records sequentially, then score the final
model on all T (the paper's Eq. 9), with pre-edit scores of the unedited model beside."""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .core.draft import Editor
from .core.prompts import PromptFormat
from .data import EditRecord

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
    before/after records compare (Loc)."""

    name: str
    answer: Callable[[nn.Module, PromptFormat, str, str], float]
    probe: Callable[[nn.Module, PromptFormat, EditRecord], list[int]] | None = None
    same: Callable[[list[int], list[int]], float] | None = None


TEACHER_FORCED = MetricKind(
    "teacher_forced",
    metrics.token_accuracy,
    lambda model, fmt, r: metrics.target_predictions(model, fmt, r.loc, r.loc_ans),
    metrics.agreement,
)
# Locality in generated form: the probe's continuation (ANSWER_NEW_TOKENS, or until the
# model stops) is unchanged token for token, in the format the editor uses.
ANSWER_EM = MetricKind(
    "answer_em",
    metrics.answer_match,
    lambda model, fmt, r: metrics.greedy_continuation(model, fmt, r.loc, metrics.ANSWER_NEW_TOKENS),
    lambda before, after: float(before == after),
)
PREFIX_EM = MetricKind("prefix_em", metrics.prefix_match)
REPLY_CONTAINS = MetricKind("reply_contains", metrics.reply_contains)


def kinds_for(fmt: PromptFormat) -> tuple[MetricKind, ...]:
    """The metric kinds a bench reports: reply contains only for chat prompts."""
    kinds = (ANSWER_EM, TEACHER_FORCED, PREFIX_EM)
    return (*kinds, REPLY_CONTAINS) if fmt.is_chat else kinds


Baseline = dict[str, list[list[int]]]  # kind name -> the unedited model's probe records


def _probed(records: Sequence[EditRecord]) -> list[EditRecord]:
    return [r for r in records if r.loc and r.loc_ans]


def locality_baseline(
    model: nn.Module, fmt: PromptFormat, records: Sequence[EditRecord]
) -> Baseline:
    return {
        k.name: [k.probe(model, fmt, r) for r in _probed(records)]
        for k in kinds_for(fmt)
        if k.probe is not None
    }


def score(
    kind: MetricKind,
    model: nn.Module,
    fmt: PromptFormat,
    records: Sequence[EditRecord],
    base: Baseline | None,
) -> Scores:
    """Rel on the prompts, Gen on the paraphrases, Loc against the unedited baseline."""
    probed = _probed(records)
    loc = None
    if base is not None and probed and kind.probe is not None and kind.same is not None:
        loc = _mean(
            [
                kind.same(before, kind.probe(model, fmt, r))
                for before, r in zip(base[kind.name], probed)
            ]
        )
    return Scores(
        rel=_mean([kind.answer(model, fmt, r.prompt, r.target) for r in records]),
        gen=_mean([kind.answer(model, fmt, r.rephrase, r.target) for r in records if r.rephrase]),
        loc=loc,
    )


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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
) -> tuple[BenchResult, Editor]:
    """Sequential editing then final-model evaluation. With ``chunk``, the records are
    edited and scored ``chunk`` at a time with a rollback (detach) between chunks and the
    scores averaged, as the reference does for small T. ``fmt``: how prompts are written
    (the editors' own format). Returns the result and the last editor (still attached)."""
    records = list(records)
    if not records:
        raise ValueError("no records to edit")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = chunk or len(records)
    groups = [records[i : i + size] for i in range(0, len(records), size)]
    kinds = kinds_for(fmt)
    base = locality_baseline(model, fmt, records)
    pre = {k.name: score(k, model, fmt, records, None) for k in kinds}
    parts: dict[str, list[tuple[int, Scores]]] = {k.name: [] for k in kinds}
    times: list[float] = []
    bar = tqdm(total=len(records), desc=f"{method} edits", unit="edit", disable=not progress)
    editor: Editor | None = None
    offset = 0
    for group in groups:
        if editor is not None:
            editor.detach()
        editor = make_editor()
        for record in group:
            started = time.perf_counter()
            editor.edit(record.prompt, record.target)
            times.append(time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(s_per_edit=f"{statistics.fmean(times):.2f}")
        part = _slice_baseline(base, records, offset, len(group))
        for kind in kinds:
            parts[kind.name].append((len(group), score(kind, model, fmt, group, part)))
        offset += len(group)
    bar.close()
    result = BenchResult(
        method=method,
        mode=mode,
        edits=len(records),
        dataset=dataset,
        prompt_format=fmt.kind,
        scores={name: _weighted(p) for name, p in parts.items()},
        pre_edit=pre,
        seconds_per_edit=round(statistics.fmean(times), 3),
        peak_memory_mb=round(peak_memory_mb(device), 1),
    )
    assert editor is not None  # records is not empty
    return result, editor


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
