"""Saving and loading an editor's state: JSON for everything readable, safetensors for
tensors. Loading never unpickles anything."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .config import WiseConfig

if TYPE_CHECKING:
    from .editor import WiseEditor

FORMAT_VERSION = 1
CONFIG_FILE = "wise_config.json"
STATE_FILE = "wise_state.json"
TENSOR_FILE = "wise_memories.safetensors"


def _memory_tensors(editor: WiseEditor) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i, memory in enumerate(editor.layer.memories):
        tensors[f"memory.{i}.delta"] = memory.delta
        for j, mask in enumerate(memory.masks):
            tensors[f"memory.{i}.mask.{j}"] = mask
        for j, values in enumerate(memory.shard_values):
            tensors[f"memory.{i}.shard.{j}"] = values
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _state(editor: WiseEditor) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": editor.fingerprint,
        "score_scale": editor.score_scale,
        "prefixes": editor.prefixes,
        "memories": [
            {
                "epsilon": m.epsilon,
                "edit_ids": m.edit_ids,
                "merges": m.merges,
                "closed": m.closed,
                "masks": len(m.masks),
                "shards": len(m.shard_values),
            }
            for m in editor.layer.memories
        ],
        "edit_log": editor.edit_log,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def save_editor(editor: WiseEditor, path: str | os.PathLike[str]) -> None:
    """Written to a sibling temp directory and renamed, so a crash never leaves a
    half-written save behind; an existing save at ``path`` is replaced."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_json(tmp / CONFIG_FILE, editor.config.to_dict())
        _write_json(tmp / STATE_FILE, _state(editor))
        save_file(
            _memory_tensors(editor),
            str(tmp / TENSOR_FILE),
            metadata={"format": "wise-edit", "version": str(FORMAT_VERSION)},
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_saved(
    path: str | os.PathLike[str],
) -> tuple[WiseConfig, dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(path)
    missing = [f for f in (CONFIG_FILE, STATE_FILE, TENSOR_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a wise-edit save (missing {', '.join(missing)})")
    config = WiseConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported format_version {state.get('format_version')}")
    return config, state, load_file(str(folder / TENSOR_FILE))


def load_editor(
    cls: type[WiseEditor], model, tokenizer, path, irrelevant_prompts=None
) -> WiseEditor:
    config, state, tensors = read_saved(path)
    editor = cls(model, tokenizer, config, irrelevant_prompts)
    try:
        _check_fingerprint(editor.fingerprint, state["fingerprint"], path)
        editor.score_scale = state["score_scale"]
        editor.prefixes = state["prefixes"]
        editor.edit_log = state["edit_log"]
        for i, meta in enumerate(state["memories"]):
            memory = editor.layer.new_memory()
            memory.delta.copy_(tensors[f"memory.{i}.delta"])
            memory.masks = [tensors[f"memory.{i}.mask.{j}"] for j in range(meta["masks"])]
            memory.shard_values = [
                tensors[f"memory.{i}.shard.{j}"].to(memory.delta.device)
                for j in range(meta["shards"])
            ]
            memory.epsilon = float(meta["epsilon"])
            memory.edit_ids = list(meta["edit_ids"])
            memory.merges = int(meta["merges"])
            memory.closed = bool(meta["closed"])
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
