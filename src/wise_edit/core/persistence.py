"""The save format, Hugging Face style: JSON for everything readable, safetensors for
tensors, fixed file names for every method. Loading never unpickles anything.

A save is a folder with
- ``editor_config.json``: the method's config fields and a ``method`` key;
- ``editor_state.json``: format version, method, fingerprint of the wrapped weight, edit
  log, and what the method adds;
- ``editor_model.safetensors``: the method's tensors.

This module knows files, not editors: `EditorBase.save_pretrained` hands it a `Saved`
and `from_pretrained` gets one back. Saves written before the fixed names (one set of
names per method, format version 1) are still read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "editor_config.json"
STATE_FILE = "editor_state.json"
TENSOR_FILE = "editor_model.safetensors"
FORMAT_VERSION = 2
# method -> (config, state, tensors) file names of format version 1
LEGACY_FILES = MappingProxyType(
    {
        "WISE": ("wise_config.json", "wise_state.json", "wise_memories.safetensors"),
        "FT-L": ("ft_l_config.json", "ft_l_state.json", "ft_l_delta.safetensors"),
        "FT-EWC": ("ft_ewc_config.json", "ft_ewc_state.json", "ft_ewc_delta.safetensors"),
        "GRACE": ("grace_config.json", "grace_state.json", "grace_codebook.safetensors"),
        "DEFER": ("defer_config.json", "defer_state.json", "defer_model.safetensors"),
    }
)


@dataclass
class Saved:
    """One save's contents: ``config`` holds the config fields (without ``method``),
    ``state`` the JSON state (fingerprint, edit log, the method's own fields)."""

    method: str
    config: dict[str, Any]
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# Config fields added after saves were first written, with the value the older saves'
# edits were made with: raw prompts, targets trained without a stop token.
MADE_WITHOUT = {"prompt_format": "raw", "train_stop": False}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_save(path: str | os.PathLike[str], saved: Saved) -> None:
    """Written to a sibling temp directory and renamed, so a crash never leaves a
    half-written save behind; an existing save at ``path`` is replaced."""
    state = {"format_version": FORMAT_VERSION, "method": saved.method, **saved.state}
    tensors = {k: v.detach().cpu().contiguous() for k, v in saved.tensors.items()}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_json(tmp / CONFIG_FILE, {"method": saved.method, **saved.config})
        _write_json(tmp / STATE_FILE, state)
        save_file(
            tensors,
            str(tmp / TENSOR_FILE),
            metadata={"format": "wise-edit", "method": saved.method, "version": "2"},
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files(folder: Path) -> tuple[Path, Path, Path]:
    """The three files of the save in ``folder``, in the current or the old layout."""
    names = [(CONFIG_FILE, STATE_FILE, TENSOR_FILE), *LEGACY_FILES.values()]
    for config, state, tensors in names:
        if (folder / config).is_file():
            return folder / config, folder / state, folder / tensors
    raise FileNotFoundError(f"{folder} is not a wise-edit save (no {CONFIG_FILE})")


def saved_method(path: str | os.PathLike[str]) -> str:
    """The method name a save was written by (reads only its small JSON files)."""
    config_file, state_file, _ = _files(Path(path))
    method = json.loads(config_file.read_text()).get("method")
    if method is None and state_file.is_file():  # format 1 kept it in the state only
        method = json.loads(state_file.read_text()).get("method")
    if not isinstance(method, str):
        raise ValueError(f"{path}: the save does not say which method wrote it")
    return method


def read_save(path: str | os.PathLike[str]) -> Saved:
    folder = Path(path)
    config_file, state_file, tensor_file = _files(folder)
    missing = [f.name for f in (state_file, tensor_file) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is an incomplete save (missing {', '.join(missing)})")
    config = json.loads(config_file.read_text())
    state = json.loads(state_file.read_text())
    if state.get("format_version") not in (1, FORMAT_VERSION):
        raise ValueError(f"{folder}: unsupported format_version {state.get('format_version')}")
    method = config.pop("method", None) or state.get("method")
    for name, value in MADE_WITHOUT.items():
        config.setdefault(name, value)
    return Saved(method, config, state, load_file(str(tensor_file)))
