"""Trained editor networks in the wise-edit cache folder, one per model, edited weight,
prompt format and network shape.

A network is trained on one model's gradients: reused for another model (even one that
differs only in layers above or below the edited weight) it would turn gradients it
never saw into edits. So the folder is named by a hash of every parameter of the model
and the settings the network depends on, and loading checks the recorded hash again.
Written as safetensors + JSON into a temporary folder that is renamed into place, so a
killed training run never leaves a half-written network behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...models import default_cache_dir
from .network import EditorNetwork

logger = logging.getLogger(__name__)

NETWORK_FILE = "editor_network.safetensors"
META_FILE = "editor_network.json"
FORMAT_VERSION = 1
KEY_FIELDS = ("model_sha256", "target_module", "prompt_format", "train_stop", "rank")
"""What a trained network is tied to: a network is looked up, and checked, by these."""


def model_sha256(model: nn.Module) -> str:
    """sha256 of every parameter of ``model`` (names, dtypes, shapes and values), so a
    network is never reused for a model that differs anywhere."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def network_key(fields: Mapping[str, Any]) -> str:
    """The cache folder name of a network tied to ``fields`` (the `KEY_FIELDS`)."""
    text = json.dumps({k: fields[k] for k in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_folder(
    fields: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the network for ``fields`` lives: ``<wise-edit cache>/mend/<key>``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "mend" / network_key(fields)


def save_network(folder: Path, network: EditorNetwork, meta: Mapping[str, Any]) -> None:
    """Write ``network`` and ``meta`` (JSON) to ``folder`` atomically, replacing it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(tensors, str(tmp / NETWORK_FILE))
        record = {"format_version": FORMAT_VERSION, **meta}
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        (tmp / META_FILE).write_text(text, encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the MEND editor network to %s", folder)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The network's JSON record, or None when ``folder`` holds no complete network."""
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta if (Path(folder) / NETWORK_FILE).is_file() else None


def load_network(
    folder: Path, fields: Mapping[str, Any], in_dim: int, out_dim: int
) -> tuple[EditorNetwork, dict[str, Any]]:
    """The network in ``folder`` and its record, checked against ``fields`` (the model
    and settings it must have been trained for) and the edited weight's shape. Raises
    FileNotFoundError when there is none, ValueError when it was trained for something
    else or its tensors do not fit."""
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"no trained MEND editor network in {folder}")
    differ = [k for k in KEY_FIELDS if meta.get(k) != fields[k]]
    if differ:
        raise ValueError(
            f"the MEND editor network in {folder} was trained for another "
            f"{', '.join(differ)} ({', '.join(f'{meta.get(k)!r}' for k in differ)}); "
            "train one for this model with `wise-edit train-mend`"
        )
    network = EditorNetwork(in_dim, out_dim, rank=fields["rank"])
    tensors = load_file(str(Path(folder) / NETWORK_FILE))
    expected = network.shapes()
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ValueError(f"{folder}/{NETWORK_FILE} does not hold a network of shapes {expected}")
    if not all(torch.isfinite(v).all() for v in tensors.values()):
        raise ValueError(f"{folder}/{NETWORK_FILE} holds NaN or infinite values")
    network.load_state_dict(tensors)
    return network, meta
