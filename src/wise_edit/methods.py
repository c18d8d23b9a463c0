"""The editors wise-edit can run, by the name the CLI uses, and loading any save."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from .baselines import (
    AlphaEditEditor,
    DeferEditor,
    FTEWCEditor,
    FTLEditor,
    GraceEditor,
    MEMITEditor,
    MEMITMassEditor,
    MendEditor,
    ROMEEditor,
)
from .core.config import flatten
from .core.editor import EditorBase
from .core.persistence import saved_method
from .migrate import canonical_settings
from .wise import WiseEditor

# Queued edits `wise-edit serve` makes together at most, where the method can (WISE with
# one-edit side memories, the defaults): the same edits as one at a time in fewer,
# larger forwards; an edit of a group is applied when the whole group is
SERVE_BATCH = 8

METHODS: MappingProxyType[str, type[EditorBase]] = MappingProxyType(
    {
        "wise": WiseEditor,
        "ft-l": FTLEditor,
        "ft-ewc": FTEWCEditor,
        "grace": GraceEditor,
        "defer": DeferEditor,
        "mend": MendEditor,
        "rome": ROMEEditor,
        "memit": MEMITEditor,
        "memit-mass": MEMITMassEditor,
        "alphaedit": AlphaEditEditor,
    }
)


def editor_class(name: str) -> type[EditorBase]:
    """The editor class for a CLI name ("wise", "grace", ...) or a method name ("WISE")."""
    for key, cls in METHODS.items():
        if name.lower() in (key, cls.method.lower()):
            return cls
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def make_config(cls: type[EditorBase], model: nn.Module, overrides: dict[str, Any]) -> Any:
    """The method's preset for ``model`` with ``overrides`` (dotted or older flat names);
    an unknown setting is a ValueError naming it (one the model cannot hold, such as
    prefixes beyond its context, is refused when the editor is made)."""
    return cls.config_class.for_model(model, **overrides)


def settings_that_differ(
    cls: type[EditorBase], saved: dict[str, Any], given: dict[str, Any]
) -> list[str]:
    """The ``given`` settings whose value is not the ``saved`` config's, each as
    'name (save: X, given: Y)': a run that continues a save keeps the save's config, so
    a setting given again must agree with it (a default changed since does not count)."""
    saved = flatten(saved)
    return [
        f"{name} (save: {saved.get(name)!r}, given: {value!r})"
        for name, value in canonical_settings(cls.config_class, given).items()
        if _as_json(saved.get(name)) != _as_json(value)
    ]


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def load_editor(
    model: nn.Module, tokenizer: Any, path: str | Path, irrelevant_prompts: Any = None
) -> EditorBase:
    """Re-attach a save of any method to ``model``; the method is read from the save."""
    cls = editor_class(saved_method(path))
    return cls.from_pretrained(model, tokenizer, path, irrelevant_prompts)
