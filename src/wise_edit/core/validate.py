"""Checks of what a save holds, before anything is attached to a model.

A save is data from disk: any field may be missing, of the wrong type, out of range or
not finite, and any tensor may have the wrong shape or dtype. Each check names the file
and the key of the first thing wrong, so a user can tell a damaged save from a bug.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import torch

from .persistence import STATE_FILE, TENSOR_FILE, CorruptSaveError


class SaveChecker:
    """Checks for one save folder; ``where`` is the folder, for messages."""

    def __init__(self, where: Any, tensors: Mapping[str, torch.Tensor]) -> None:
        self.where = where
        self.tensors = tensors
        self.seen: set[str] = set()

    def fail(self, file: str, key: str, why: str) -> NoReturn:
        raise CorruptSaveError(f"{self.where}/{file}: {key} {why}")

    # ------------------------------------------------------------------ JSON fields
    def field(self, data: Mapping[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
        """``data[key]`` of one of ``types`` (bool is never an int here)."""
        if not isinstance(data, Mapping) or key not in data:
            self.fail(STATE_FILE, key, "is missing")
        value = data[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in allowed:
            self.fail(STATE_FILE, key, f"must be {_names(allowed)}, got {value!r}")
        if not isinstance(value, allowed):
            self.fail(STATE_FILE, key, f"must be {_names(allowed)}, got {type(value).__name__}")
        return value

    def integer(
        self, data: Mapping[str, Any], key: str, low: int = 0, high: int | None = None
    ) -> int:
        value = self.field(data, key, int)
        if value < low or (high is not None and value > high):
            upper = "" if high is None else f", at most {high}"
            self.fail(STATE_FILE, key, f"must be at least {low}{upper}, got {value}")
        return value

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        low: float | None = None,
        optional: bool = False,
        high: float | None = None,
    ) -> float | None:
        if optional and data.get(key, None) is None:
            return None
        value = float(self.field(data, key, (int, float)))
        if not math.isfinite(value):
            self.fail(STATE_FILE, key, f"must be finite, got {value}")
        if low is not None and value < low:
            self.fail(STATE_FILE, key, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            self.fail(STATE_FILE, key, f"must be at most {high}, got {value}")
        return value

    def strings(
        self, data: Mapping[str, Any], key: str, optional: bool = False
    ) -> list[str] | None:
        if optional and data.get(key, None) is None:
            return None
        value = self.field(data, key, list)
        if not all(isinstance(v, str) for v in value):
            self.fail(STATE_FILE, key, "must be a list of strings")
        return value

    def edit_log(self, state: Mapping[str, Any]) -> list[dict[str, Any]]:
        log = self.field(state, "edit_log", list)
        for i, entry in enumerate(log):
            where = f"edit_log[{i}]"
            if not isinstance(entry, Mapping):
                self.fail(STATE_FILE, where, "must be an object")
            for key in ("prompt", "target"):
                if not isinstance(entry.get(key), str):
                    self.fail(STATE_FILE, f"{where}.{key}", "must be a string")
            if "subject" in entry and not (
                isinstance(entry["subject"], str) and entry["subject"].strip()
            ):
                self.fail(STATE_FILE, f"{where}.subject", "must be a non-empty string")
            if entry.get("index") != i:
                self.fail(STATE_FILE, f"{where}.index", f"must be {i}, got {entry.get('index')!r}")
        return log

    def edits_held(self, log: Sequence[Mapping[str, Any]], held: set[int], by: str) -> None:
        """Every edit of the log that is not retracted is held by one of ``by`` (a
        method's memories), and no retracted one is: a log entry that nothing holds
        would be counted, resumed past and reported as made while the model lacks it."""
        live = {i for i, entry in enumerate(log) if not entry.get("retracted")}
        lacking = sorted(live - held)
        if lacking:
            why = f"is an edit that none of the {by} holds"
            self.fail(STATE_FILE, f"edit_log[{lacking[0]}]", why)
        stale = sorted(held - live)
        if stale:
            self.fail(STATE_FILE, by, f"hold edit {stale[0]}, which the edit_log marks retracted")

    # ------------------------------------------------------------------ tensors
    def tensor(
        self,
        key: str,
        shape: Sequence[int] | None = None,
        kind: str = "float",
        bound: float | None = None,
    ) -> torch.Tensor:
        """A tensor of the expected kind ("float" or "bool") and shape; float tensors
        finite and, with ``bound``, within +-bound."""
        if key not in self.tensors:
            self.fail(TENSOR_FILE, key, "is missing")
        value = self.tensors[key]
        self.seen.add(key)
        if kind == "bool" and value.dtype != torch.bool:
            self.fail(TENSOR_FILE, key, f"must be bool, got {value.dtype}")
        if kind == "float" and not value.is_floating_point():
            self.fail(TENSOR_FILE, key, f"must be floating point, got {value.dtype}")
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.fail(TENSOR_FILE, key, f"has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if kind == "float":
            if not torch.isfinite(value).all():
                self.fail(TENSOR_FILE, key, "holds NaN or infinite values")
            if bound is not None and value.numel() and value.abs().max().item() > bound * 1.0001:
                self.fail(TENSOR_FILE, key, f"exceeds the norm bound {bound}")
        return value

    def no_other_tensors(self) -> None:
        extra = sorted(set(self.tensors) - self.seen)
        if extra:
            self.fail(TENSOR_FILE, extra[0], "is not a tensor this method saves")


def _names(types: tuple[type, ...]) -> str:
    words = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        bool: "true/false",
    }
    return " or ".join(words.get(t, t.__name__) for t in types)
