"""A JSONL stream of edits applied to an editor and its save folder so that nothing is
lost and nothing is applied twice.

Each applied record is logged with the edit as ``meta`` (file name, line number, sha256
of the record), and the editor is checkpointed into the locked save folder every few
edits, after the last, and before a failing record is reported. A resumed run compares
the file with what the save says was applied: unchanged records are skipped, new ones
applied in order, and a record that changed since it was applied is refused unless the
caller asks to apply the new version too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def record_meta(file: Path, line: JsonlLine) -> dict[str, Any]:
    """What the edit log keeps of where an edit came from."""
    return {"file": file.name, "line": line.number, "sha256": line.sha256}


def plan_stream(
    edit_log: Sequence[dict[str, Any]],
    file: Path,
    lines: Sequence[JsonlLine],
    reapply_changed: bool = False,
) -> StreamPlan:
    """Which records of ``file`` still need applying, given the editor's log."""
    applied: dict[int, str] = {}
    for entry in edit_log:
        meta = entry.get("meta")
        if isinstance(meta, dict) and meta.get("file") == file.name:
            applied[meta.get("line", -1)] = meta.get("sha256", "")
    changed = [
        line.number for line in lines if applied.get(line.number, line.sha256) != line.sha256
    ]
    if changed and not reapply_changed:
        shown = ", ".join(map(str, changed[:5])) + (" ..." if len(changed) > 5 else "")
        raise StreamError(
            f"{file}: line(s) {shown} changed since they were applied to this save; "
            "fix the file, or pass --reapply-changed to apply the new versions as new edits"
        )
    todo = [line for line in lines if applied.get(line.number) != line.sha256]
    return StreamPlan(todo, len(lines) - len(todo))


def apply_stream(
    editor: Editor,
    folder: SaveFolder,
    file: Path,
    todo: Sequence[JsonlLine],
    checkpoint_every: int,
    progress: bool = True,
) -> int:
    """Apply ``todo`` in order; returns how many were applied. A checkpoint is written
    every ``checkpoint_every`` edits and whenever the loop ends with unsaved edits (the
    last record, a failing record, Ctrl-C)."""
    if checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    applied = unsaved = 0
    bar = tqdm(todo, desc=editor.method, unit="edit", disable=not progress)
    try:
        for line in bar:
            record = line.record
            try:
                meta = record_meta(file, line)
                result = editor.edit(record.prompt, record.target, meta, subject=record.subject)
            except (ValueError, TypeError, ArithmeticError) as err:
                raise StreamError(f"{file}: line {line.number}: {err}") from err
            applied, unsaved = applied + 1, unsaved + 1
            bar.set_postfix(s_per_edit=f"{result.seconds:.2f}")
            if unsaved >= checkpoint_every:
                folder.write(editor.snapshot())
                unsaved = 0
    finally:
        if unsaved:
            folder.write(editor.snapshot())
    return applied
