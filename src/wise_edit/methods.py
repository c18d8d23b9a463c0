"""The editors wise-edit can run, by the name the CLI uses, and loading any save."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from .baselines import DeferEditor, FTEWCEditor, FTLEditor, GraceEditor
from .core.editor import EditorBase
from .core.persistence import saved_method
from .wise import WiseEditor

METHODS: MappingProxyType[str, type[EditorBase]] = MappingProxyType(
    {
        "wise": WiseEditor,
        "ft-l": FTLEditor,
        "ft-ewc": FTEWCEditor,
        "grace": GraceEditor,
        "defer": DeferEditor,
    }
)


def editor_class(name: str) -> type[EditorBase]:
    """The editor class for a CLI name ("wise", "grace", ...) or a method name ("WISE")."""
    for key, cls in METHODS.items():
        if name.lower() in (key, cls.method.lower()):
            return cls
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


def make_config(cls: type[EditorBase], model: nn.Module, overrides: dict[str, Any]) -> Any:
    """The method's preset for ``model`` with ``overrides``; an unknown field is a
    ValueError naming it."""
    fields = cls.config_class.__dataclass_fields__
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.config_class.__name__} field(s): {', '.join(unknown)} "
            f"(known: {', '.join(sorted(fields))})"
        )
    return cls.config_class.for_model(model, **overrides)


def settings_that_differ(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The ``given`` config settings whose value is not the ``saved`` one, each as
    'name (save: X, given: Y)': a run that continues a save keeps the save's config, so
    a setting given again must agree with it (a default changed since does not count)."""
    return [
        f"{name} (save: {saved.get(name)!r}, given: {value!r})"
        for name, value in given.items()
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
