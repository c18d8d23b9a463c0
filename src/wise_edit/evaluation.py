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
from .data import EditRecord
from .rows import target_ids

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


@dataclass
class Baseline:
    """What the unedited model predicts on the locality probes, kept for comparison."""

    tf_loc: list[list[int]]
    gen_loc: list[list[int]]


def loc_budget(tokenizer: Any, record: EditRecord) -> int:
    return len(target_ids(tokenizer, record.loc_ans or "x")) + 2


def locality_baseline(model: nn.Module, tokenizer: Any, records: Sequence[EditRecord]) -> Baseline:
    with_loc = [r for r in records if r.loc and r.loc_ans]
    return Baseline(
        tf_loc=[metrics.target_predictions(model, tokenizer, r.loc, r.loc_ans) for r in with_loc],
        gen_loc=[
            metrics.greedy_continuation(model, tokenizer, r.loc, loc_budget(tokenizer, r))
            for r in with_loc
        ],
    )


def teacher_forced(
    model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], base: Baseline | None
) -> Scores:
    with_loc = [r for r in records if r.loc and r.loc_ans]
    loc = None
    if base is not None and with_loc:
        loc = _mean(
            [
                metrics.agreement(
                    before, metrics.target_predictions(model, tokenizer, r.loc, r.loc_ans)
                )
                for before, r in zip(base.tf_loc, with_loc)
            ]
        )
    return Scores(
        rel=_mean([metrics.token_accuracy(model, tokenizer, r.prompt, r.target) for r in records]),
        gen=_mean(
            [
                metrics.token_accuracy(model, tokenizer, r.rephrase, r.target)
                for r in records
                if r.rephrase
            ]
        ),
        loc=loc,
    )


def generated(
    model: nn.Module, tokenizer: Any, records: Sequence[EditRecord], base: Baseline | None
) -> Scores:
    with_loc = [r for r in records if r.loc and r.loc_ans]
    loc = None
    if base is not None and with_loc:
        loc = _mean(
            [
                float(
                    before
                    == metrics.greedy_continuation(
                        model, tokenizer, r.loc, loc_budget(tokenizer, r)
                    )
                )
                for before, r in zip(base.gen_loc, with_loc)
            ]
        )
    return Scores(
        rel=_mean([metrics.generated_match(model, tokenizer, r.prompt, r.target) for r in records]),
        gen=_mean(
            [
                metrics.generated_match(model, tokenizer, r.rephrase, r.target)
                for r in records
                if r.rephrase
            ]
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
    make_editor: Callable[[], Any],
    *,
    method: str,
    mode: str,
    dataset: str,
    chunk: int | None = None,
    progress: bool = True,
) -> tuple[BenchResult, Any]:
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
    pre = {
        "teacher_forced": teacher_forced(model, tokenizer, records, None),
        "generated": generated(model, tokenizer, records, None),
    }
    tf_parts, gen_parts, times = [], [], []
    bar = tqdm(total=len(records), desc=f"{method} edits", unit="edit", disable=not progress)
    editor, offset = None, 0
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
        tf_parts.append((len(group), teacher_forced(model, tokenizer, group, part)))
        gen_parts.append((len(group), generated(model, tokenizer, group, part)))
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
    return result, editor


def _slice_baseline(base: Baseline, records: list[EditRecord], start: int, count: int) -> Baseline:
    """The baseline entries of records[start:start+count] (only records with a probe have one)."""
    has = [bool(r.loc and r.loc_ans) for r in records]
    first = sum(has[:start])
    n = sum(has[start : start + count])
    return Baseline(base.tf_loc[first : first + n], base.gen_loc[first : first + n])


def _weighted(parts: list[tuple[int, Scores]]) -> Scores:
    out = Scores()
    for name in ("rel", "gen", "loc"):
        pairs = [(n, getattr(s, name)) for n, s in parts if getattr(s, name) is not None]
        if pairs:
            total = sum(n for n, _ in pairs)
            setattr(out, name, round(sum(n * v for n, v in pairs) / total, 4))
    return out


@torch.no_grad()
def latency_ratio(editor: Any, prompts: Sequence[str], repeats: int = 5) -> dict[str, float]:
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
        with editor.layer.disabled():
            plain.append(timed())
    edited_s, plain_s = statistics.median(edited), statistics.median(plain)
    return {"edited_s": edited_s, "unedited_s": plain_s, "ratio": edited_s / plain_s}
