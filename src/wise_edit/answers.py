"""What an edited model actually answers (`wise-edit inspect`): for each edited record, the
answer to its prompt, its paraphrase and, if asked, its locality probe, whether each is
right, and which edit memory answered. The bench's scores say how many edits miss; this
says which, and where each miss went (no memory, another edit's memory, or its own
memory with a wrong answer)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from .core.editor import EditorBase
from .data import EditRecord
from .metrics import ANSWER_NEW_TOKENS, answer_text, exact_answer, greedy_continuation

KINDS = ("prompt", "rephrase", "locality")  # the edit prompt, its paraphrase, its locality probe
DEFAULT_KINDS = ("prompt", "rephrase")


@dataclasses.dataclass(frozen=True)
class ProbeAnswer:
    """One prompt of a record, asked of the edited model.

    ``exact``: for the edit prompt and its paraphrase, the whole answer is the record's
    target (answer exact match, as the bench scores it); for a locality probe, the
    generated tokens are the unedited model's (generated Loc). ``memory`` is what
    `Editor.routed` gives for the prompt (-1: the unedited model answered) and
    ``own_memory`` the memory holding the record's edit (None where the method cannot
    name one). ``a_target_of_the_memory``: the answer is a target that the memory which
    answered was taught, by some edit (a miss that says another edit's answer)."""

    text: str
    answer: str
    exact: bool
    memory: int
    own_memory: int | None
    a_target_of_the_memory: bool

    @property
    def cause(self) -> str:
        """Why the answer is right or not: "exact", or where the prompt went ("wrong
        answer" alone where the record's own memory is not known)."""
        if self.exact:
            return "exact"
        if self.memory < 0:
            return "miss: routed to no memory"
        if self.own_memory is None:
            return "miss: wrong answer"
        if self.memory != self.own_memory:
            return "miss: routed to another memory"
        return "miss: own memory, wrong answer"


@dataclasses.dataclass(frozen=True)
class RecordAnswers:
    """The answers to one record's prompts, by kind (a kind the record lacks is absent)."""

    index: int
    target: str
    probes: dict[str, ProbeAnswer]

    def to_json(self) -> dict[str, Any]:
        """One JSON object: ``index``, ``target`` and an object per kind."""
        out: dict[str, Any] = {"index": self.index, "target": self.target}
        out.update({kind: dataclasses.asdict(p) for kind, p in self.probes.items()})
        return out

    def line(self) -> str:
        """One line for people: each kind's verdict, memory and answer."""
        parts = [f"{self.index:4d} target={self.target!r}"]
        for kind, p in self.probes.items():
            mark = "ok  " if p.exact else "MISS"
            parts.append(f"{kind[:3]} {mark} mem {p.memory:>3} answer={p.answer!r}")
        return " | ".join(parts)


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple, or a ValueError naming the ones that are not in `KINDS`."""
    chosen = tuple(kinds)
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise ValueError(f"kinds {', '.join(unknown) or '(none)'}: choose from {', '.join(KINDS)}")
    return chosen


@torch.no_grad()
def inspect_answers(
    editor: EditorBase,
    records: Sequence[EditRecord],
    kinds: Iterable[str] = DEFAULT_KINDS,
    indices: Iterable[int] | None = None,
    max_new_tokens: int = ANSWER_NEW_TOKENS,
) -> Iterator[RecordAnswers]:
    """Ask the edited model each record's prompts of ``kinds`` and yield, per record, what
    it answered and where the prompt was routed.

    Record i must be the record of edit i (the order the editor was given them), so that
    its own memory is `editor.memory_holding(i)`. ``indices`` picks the records asked
    (all by default). Answers are greedy, generated until the model stops or
    ``max_new_tokens`` (the bench's answer budget), one prompt at a time; records are
    yielded as they are done, so a caller can print them while the rest run."""
    kinds = check_kinds(kinds)
    model, fmt = editor.model, editor.format
    taught: dict[int | None, list[str]] = {}  # memory -> the targets its edits taught
    for j, entry in enumerate(editor.edit_log):
        taught.setdefault(editor.memory_holding(j), []).append(entry["target"])
    for i in range(len(records)) if indices is None else indices:
        record = records[i]
        asked = {"prompt": record.prompt, "rephrase": record.rephrase, "locality": record.loc}
        probes: dict[str, ProbeAnswer] = {}
        for kind in kinds:
            prompt = asked[kind]
            if not prompt:
                continue
            ids = greedy_continuation(model, fmt, prompt, max_new_tokens)
            answer = answer_text(fmt, ids)
            if kind == "locality":  # right when unchanged, as generated Loc compares them
                with editor.disabled():
                    exact = ids == greedy_continuation(model, fmt, prompt, max_new_tokens)
            else:
                exact = bool(exact_answer(answer, record.target))
            memory = editor.routed([prompt])[0]
            probes[kind] = ProbeAnswer(
                text=prompt,
                answer=answer,
                exact=exact,
                memory=memory,
                own_memory=editor.memory_holding(i),
                a_target_of_the_memory=any(exact_answer(answer, t) for t in taught.get(memory, ())),
            )
        yield RecordAnswers(index=i, target=record.target, probes=probes)


def miss_summary(rows: Iterable[RecordAnswers]) -> str:
    """Per kind, the answers counted by cause (`ProbeAnswer.cause`), and how many of the
    misses said a target their memory was taught. For a locality probe a "miss" is a
    changed answer, and its "own memory" the memory of the edit the probe belongs to."""
    causes: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    for row in rows:
        for kind, p in row.probes.items():
            causes[kind][p.cause] += 1
            if not p.exact and p.a_target_of_the_memory:
                causes[kind]["(of the misses: said a target the memory was taught)"] += 1
    return "\n".join(
        f"{kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        for kind, counts in causes.items()
        if counts
    )
