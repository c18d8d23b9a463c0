"""The service's durable edit log: SQLite (standard library) in WAL mode.

An edit is a row of ``edits``; what the worker must do, in order, is a row of ``ops``
(apply an edit, retract one). Both are committed before an id is returned, so an
accepted edit survives any crash. ``checkpoint_seq`` records the last op the editor's
checkpoint reflects: on start, every op after it is done again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("pending", "applied", "failed", "retracted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    target TEXT NOT NULL,
    rephrase TEXT,
    subject TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    memory INTEGER,
    steps INTEGER,
    seconds REAL,
    retract_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL
);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('edit', 'retract')),
    edit_id INTEGER NOT NULL REFERENCES edits(id),
    done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# columns added after the first release, for `_add_missing_columns`
_ADDED_COLUMNS = (("subject", "TEXT"),)

_FIELDS = (
    "id, prompt, target, rephrase, subject, status, error, memory, steps, seconds, "
    "retract_requested, created, updated"
)


@dataclass(frozen=True)
class Op:
    """One thing the worker does: ``kind`` "edit" or "retract" of edit ``edit_id``."""

    seq: int
    kind: str
    edit_id: int


class EditLog:
    """The SQLite file of one service. One connection, used under a lock (the worker and
    request threads share it; SQLite serialises writes anyway)."""

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the log; a file that is no SQLite database of ours is a
        ValueError naming it, one line at start-up rather than a traceback."""
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as err:
            raise ValueError(f"{self.path}: cannot open the edit log ({err})") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise ValueError(f"{self.path}: not a wise-edit edit log ({err})") from None

    def _add_missing_columns(self) -> None:
        """Logs written before a column existed gain it (empty): a service started on
        an older state folder keeps its edits."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(edits)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE edits ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLITE_FULL has rolled it back already
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ requests
    def add_edits(self, records: Sequence[dict[str, Any]]) -> list[int]:
        """Append edits and their ops in one transaction; their ids once committed."""
        now = time.time()
        ids = []
        with self._transaction() as db:
            for r in records:
                cur = db.execute(
                    "INSERT INTO edits (prompt, target, rephrase, subject, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (r["prompt"], r["target"], r.get("rephrase"), r.get("subject"), now),
                )
                ids.append(int(cur.lastrowid or 0))
                db.execute("INSERT INTO ops (kind, edit_id) VALUES ('edit', ?)", (ids[-1],))
        return ids

    def request_retraction(self, edit_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE edits SET retract_requested = 1 WHERE id = ?", (edit_id,))
            db.execute("INSERT INTO ops (kind, edit_id) VALUES ('retract', ?)", (edit_id,))

    def get(self, edit_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_FIELDS} FROM edits WHERE id = ?", (edit_id,))
            found = row.fetchone()
        return None if found is None else _public(found)

    def page(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Edits with id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_FIELDS} FROM edits WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            ).fetchall()
        return [_public(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM edits GROUP BY status")
            found = dict(rows.fetchall())
        return {s: int(found.get(s, 0)) for s in STATUSES}

    # ------------------------------------------------------------------ the worker
    def next_op(self) -> Op | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, kind, edit_id FROM ops WHERE done = 0 ORDER BY seq LIMIT 1"
            ).fetchone()
        return None if row is None else Op(int(row[0]), str(row[1]), int(row[2]))

    def next_ops(self, limit: int) -> list[Op]:
        """The first ``limit`` ops not done yet, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, edit_id FROM ops WHERE done = 0 ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Op(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def finish(self, op: Op, status: str, **fields: Any) -> None:
        """Mark ``op`` done and set its edit's status (and ``fields``), atomically."""
        sets = ", ".join(f"{k} = ?" for k in ("status", "updated", *fields))
        with self._transaction() as db:
            db.execute(
                f"UPDATE edits SET {sets} WHERE id = ?",
                (status, time.time(), *fields.values(), op.edit_id),
            )
            db.execute("UPDATE ops SET done = 1 WHERE seq = ?", (op.seq,))

    def checkpoint_seq(self) -> int:
        with self._lock:
            return self._checkpoint_seq_locked()

    def set_checkpoint_seq(self, seq: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('checkpoint_seq', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (seq,),
            )

    def checkpointed_edits(self) -> list[int]:
        """Ids of the edits the checkpoint should hold, in the order they were applied:
        those applied by an op it reflects (a failed one is in no editor)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT e.id FROM ops o JOIN edits e ON e.id = o.edit_id WHERE o.kind = 'edit' "
                "AND o.done = 1 AND o.seq <= ? AND e.status != 'failed' ORDER BY o.seq",
                (self._checkpoint_seq_locked(),),
            ).fetchall()
        return [int(r[0]) for r in rows]

    def _checkpoint_seq_locked(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'checkpoint_seq'").fetchone()
        return 0 if row is None else int(row[0])

    def last_done_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM ops WHERE done = 1").fetchone()
        return int(row[0] or 0)

    def redo_after(self, seq: int) -> None:
        """Ops after the checkpoint are to be done again: the checkpoint lacks them."""
        with self._transaction() as db:
            db.execute("UPDATE ops SET done = 0 WHERE seq > ?", (seq,))
            db.execute(
                "UPDATE edits SET status = 'pending', error = NULL WHERE id IN "
                "(SELECT edit_id FROM ops WHERE seq > ? AND kind = 'edit')",
                (seq,),
            )
            db.execute(
                "UPDATE edits SET status = 'applied' WHERE status = 'retracted' AND id IN "
                "(SELECT edit_id FROM ops WHERE seq > ? AND kind = 'retract')",
                (seq,),
            )


def _public(row: sqlite3.Row) -> dict[str, Any]:
    """An edit as the API shows it: no empty fields."""
    out = {k: row[k] for k in row.keys() if row[k] is not None}  # noqa: SIM118 - Row
    out["retract_requested"] = bool(row["retract_requested"])
    return out
