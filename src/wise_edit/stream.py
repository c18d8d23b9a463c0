"""A JSONL stream of edits applied to an editor and its save folder so that nothing is
lost and nothing is applied twice.

Each applied record is logged with the edit as ``meta`` (file name, line number, sha256
of the record), and the editor is checkpointed into the locked save folder every few
edits, after the last, and before a failing record is reported. A resumed run compares
the file with what the save says was applied, by content (the record's sha256), not by
the file's name: a record the save holds is skipped whatever file or line it comes from
now (so the same records renamed, or a longer file that starts with them, are not
applied twice), new ones are applied in order, and a record that changed since it was
applied from this file is refused unless the caller asks to apply the new version too.
Each logged edit accounts for one record: a record given twice is applied twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .core.draft import Editor
from .core.persistence import SaveFolder
from .data import JsonlLine


class StreamError(ValueError):
    """A record of the stream could not be applied; the edits before it are saved."""


@dataclass
class StreamPlan:
    todo: list[JsonlLine]  # records still to apply, in file order
    skipped: int  # records the save already holds
    skipped_lines: list[int] = field(default_factory=list)  # their line numbers
    sources: list[str] = field(default_factory=list)  # the files they were applied from

    def describe(self, file: Path, out: Path) -> str:
        """One line saying what was skipped and why, for the user to check."""
        lines = _ranges(self.skipped_lines)
        where = ", ".join(self.sources)
        return (
            f"{self.skipped} record(s) of {file.name} are already in {out} (same content; "
            f"line(s) {lines}, applied from {where}); skipping them"
        )


def record_meta(file: Path, line: JsonlLine) -> dict[str, Any]:
    """What the edit log keeps of where an edit came from."""
    return {"file": file.name, "line": line.number, "sha256": line.sha256}


def plan_stream(
    edit_log: Sequence[dict[str, Any]],
    file: Path,
    lines: Sequence[JsonlLine],
    reapply_changed: bool = False,
) -> StreamPlan:
    """Which records of ``file`` still need applying, given the editor's log: a record
    whose content hash a logged edit carries is skipped (each logged edit matches one
    record, in order); a record at a line of this file where the log holds another
    record that no line of the file still has counts as changed."""
    metas = [e["meta"] for e in edit_log if isinstance(e.get("meta"), dict)]
    unmatched = Counter(m.get("sha256") for m in metas if isinstance(m.get("sha256"), str))
    source = {m.get("sha256"): str(m.get("file")) for m in metas}
    todo, skipped = [], []
    for line in lines:
        if unmatched[line.sha256] > 0:
            unmatched[line.sha256] -= 1
            skipped.append(line)
        else:
            todo.append(line)
    replaced = {  # lines of this file whose logged record is gone from it
        m.get("line"): m.get("sha256")
        for m in metas
        if m.get("file") == file.name and unmatched[m.get("sha256")] > 0
    }
    changed = [line.number for line in todo if line.number in replaced]
    if changed and not reapply_changed:
        shown = ", ".join(map(str, changed[:5])) + (" ..." if len(changed) > 5 else "")
        raise StreamError(
            f"{file}: line(s) {shown} changed since they were applied to this save; "
            "fix the file, or pass --reapply-changed to apply the new versions as new edits"
        )
    sources = sorted({source[line.sha256] for line in skipped})
    return StreamPlan(todo, len(skipped), [line.number for line in skipped], sources)


def _ranges(numbers: Sequence[int]) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def apply_stream(
    editor: Editor,
    folder: SaveFolder,
    file: Path,
    todo: Sequence[JsonlLine],
    checkpoint_every: int,
    progress: bool = True,
    batch: int = 1,
) -> int:
    """Apply ``todo`` in order, ``batch`` records at a time (`edit_many`); returns how
    many were applied. A checkpoint is written every ``checkpoint_every`` edits and
    whenever the loop ends with unsaved edits (the last record, a failing record or
    group, Ctrl-C)."""
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    applied = unsaved = 0
    bar = tqdm(total=len(todo), desc=editor.method, unit="edit", disable=not progress)
    try:
        for start in range(0, len(todo), batch):
            group = todo[start : start + batch]
            try:
                metas = [record_meta(file, line) for line in group]
                records = [line.record.request() for line in group]
                results = editor.edit_many(records, batch=len(group), metas=metas)
            except (ValueError, TypeError, ArithmeticError) as err:
                where = f"line {group[0].number}"
                if len(group) > 1:
                    where = f"lines {group[0].number}-{group[-1].number} (one batch)"
                raise StreamError(f"{file}: {where}: {err}") from err
            applied, unsaved = applied + len(group), unsaved + len(group)
            bar.update(len(group))
            bar.set_postfix(s_per_edit=f"{results[-1].seconds:.2f}")
            if unsaved >= checkpoint_every:
                folder.write(editor.snapshot())
                unsaved = 0
    finally:
        bar.close()
        if unsaved:
            folder.write(editor.snapshot())
    return applied
