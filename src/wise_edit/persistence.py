"""Saving and loading an editor's state: JSON for everything readable, safetensors for
tensors. Loading never unpickles anything.

Every method writes the same three files (names per method, `EditorBase.save_files`):
its config, a state JSON (format version, method, fingerprint of the wrapped weight,
edit log, and what the method adds) and one safetensors file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .editing import EditorBase

FORMAT_VERSION = 1


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def save_editor(editor: EditorBase, path: str | os.PathLike[str]) -> None:
    """Written to a sibling temp directory and renamed, so a crash never leaves a
    half-written save behind; an existing save at ``path`` is replaced."""
    config_file, state_file, tensor_file = editor.save_files
    state = {
        "format_version": FORMAT_VERSION,
        "method": editor.method,
        "fingerprint": editor.fingerprint,
        "edit_log": editor.edit_log,
        **editor._state(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in editor._tensors().items()}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_json(tmp / config_file, editor.config.to_dict())
        _write_json(tmp / state_file, state)
        save_file(
            tensors,
            str(tmp / tensor_file),
            metadata={"format": "wise-edit", "method": editor.method, "version": "1"},
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_saved(
    cls: type[EditorBase], path: str | os.PathLike[str]
) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """Config object, state and tensors of a save made by ``cls``."""
    folder = Path(path)
    missing = [f for f in cls.save_files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a wise-edit save for {cls.method} (missing {', '.join(missing)})"
        )
    config_file, state_file, tensor_file = cls.save_files
    config = cls.config_class.from_dict(json.loads((folder / config_file).read_text()))
    state = json.loads((folder / state_file).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported format_version {state.get('format_version')}")
    if state.get("method", cls.method) != cls.method:
        raise ValueError(f"{folder} holds {state['method']} edits, not {cls.method}")
    return config, state, load_file(str(folder / tensor_file))


def load_editor(
    cls: type[EditorBase], model, tokenizer, path, irrelevant_prompts=None
) -> EditorBase:
    config, state, tensors = read_saved(cls, path)
    editor = cls(model, tokenizer, config, irrelevant_prompts)
    try:
        _check_fingerprint(editor.fingerprint, state["fingerprint"], path)
        editor.edit_log = state["edit_log"]
        editor._restore(state, tensors)
    except BaseException:
        editor.detach()
        raise
    return editor


def _check_fingerprint(current: dict[str, Any], saved: dict[str, Any], path: Any) -> None:
    for key in ("model_type", "target_module", "shape", "sha256"):
        if current.get(key) != saved.get(key):
            raise ValueError(
                f"{path} was saved for a different model or layer: {key} is "
                f"{saved.get(key)!r} there but {current.get(key)!r} here"
            )
