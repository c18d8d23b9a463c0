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
from .core.rows import target_ids
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
    method: str
    mode: str
    edits: int
    dataset: str
    teacher_forced: Scores
    generated: Scores
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
    """One way of scoring: how a prompt's answer is scored (Rel/Gen), what is recorded on
    a locality probe, and how a probe's before/after records compare (Loc)."""

    name: str
    answer: Callable[[nn.Module, Any, str, str], float]
    probe: Callable[[nn.Module, Any, EditRecord], list[int]]
    same: Callable[[list[int], list[int]], float]


def loc_budget(tokenizer: Any, record: EditRecord) -> int:
    return len(target_ids(tokenizer, record.loc_ans or "x")) + metrics.EXTRA_NEW_TOKENS


TEACHER_FORCED = MetricKind(
    "teacher_forced",
    metrics.token_accuracy,
    lambda model, tok, r: metrics.target_predictions(model, tok, r.loc, r.loc_ans),
    metrics.agreement,
)
GENERATED = MetricKind(
    "generated",
    metrics.generated_match,
    lambda model, tok, r: metrics.greedy_continuation(model, tok, r.loc, loc_budget(tok, r)),
    lambda before, after: float(before == after),
)
KINDS = (TEACHER_FORCED, GENERATED)

Baseline = dict[str, list[list[int]]]  # kind name -> the unedited model's probe records


def _probed(records: Sequence[EditRecord]) -> list[EditRecord]:
    return [r for r in records if r.loc and r.loc_ans]


def locality_baseline(model: nn.Module, tokenizer: Any, records: Sequence[EditRecord]) -> Baseline:
    return {k.name: [k.probe(model, tokenizer, r) for r in _probed(records)] for k in KINDS}


def score(
    kind: MetricKind,
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[EditRecord],
    base: Baseline | None,
) -> Scores:
    """Rel on the prompts, Gen on the paraphrases, Loc against the unedited baseline."""
    probed = _probed(records)
    loc = None
    if base is not None and probed:
        loc = _mean(
            [
                kind.same(before, kind.probe(model, tokenizer, r))
                for before, r in zip(base[kind.name], probed)
            ]
        )
    return Scores(
        rel=_mean([kind.answer(model, tokenizer, r.prompt, r.target) for r in records]),
        gen=_mean(
            [kind.answer(model, tokenizer, r.rephrase, r.target) for r in records if r.rephrase]
        ),
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
    tokenizer: Any,
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
    scores averaged, as the reference does for small T. Returns the result and the last
    editor (still attached)."""
    records = list(records)
    if not records:
        raise ValueError("no records to edit")
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    size = chunk or len(records)
    groups = [records[i : i + size] for i in range(0, len(records), size)]
    base = locality_baseline(model, tokenizer, records)
    pre = {k.name: score(k, model, tokenizer, records, None) for k in KINDS}
    tf_parts, gen_parts, times = [], [], []
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
        tf_parts.append((len(group), score(TEACHER_FORCED, model, tokenizer, group, part)))
        gen_parts.append((len(group), score(GENERATED, model, tokenizer, group, part)))
        offset += len(group)
    bar.close()
    result = BenchResult(
        method=method,
        mode=mode,
        edits=len(records),
        dataset=dataset,
        teacher_forced=_weighted(tf_parts),
        generated=_weighted(gen_parts),
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
