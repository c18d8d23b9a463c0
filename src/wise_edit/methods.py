"""The editors wise-edit can run, by the name the CLI uses."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from .baselines import DeferEditor, FTEWCEditor, FTLEditor, GraceEditor
from .editing import EditorBase
from .editor import WiseEditor

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
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def saved_method(path: str | Path) -> type[EditorBase]:
    """Which editor wrote the save at ``path`` (from its config file's name)."""
    folder = Path(path)
    for cls in METHODS.values():
        if (folder / cls.save_files[0]).is_file():
            return cls
    raise FileNotFoundError(f"{folder} is not a wise-edit save (no editor config file found)")


def load_saved(
    model: nn.Module, tokenizer: Any, path: str | Path, irrelevant_prompts: Any = None
) -> EditorBase:
    """Re-attach a save of any method to ``model``."""
    return saved_method(path).load(model, tokenizer, str(path), irrelevant_prompts)
