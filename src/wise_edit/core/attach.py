"""Model surgery: finding the edited module, swapping a wrapper in and out, telling a
new sequence from a continued one, and identifying the weight edits were made against."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..families import decoder_layers


def locate_layer(model: nn.Module, target_path: str, layers_path: str) -> tuple[nn.ModuleList, int]:
    """The decoder stack and the index of the layer ``target_path`` lies in."""
    prefix = layers_path + "."
    rest = target_path[len(prefix) :] if target_path.startswith(prefix) else ""
    head = rest.split(".", 1)[0]
    if not head.isdigit():
        raise ValueError(
            f"target_module: {target_path!r} is not inside the decoder layers {layers_path!r}"
        )
    return decoder_layers(model, layers_path), int(head)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


# transformers 5.x renamed the KV cache from ``past_key_values`` to ``cache`` (in forward
# arguments and outputs); the old name stays accepted for a while. Read both, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was given, under either name; None without one."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (``use_cache=True``), under either name."""
    for name in CACHE_NAMES:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache in this transformers."""
    params = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), CACHE_NAMES[-1])


def cache_length(past: Any) -> int:
    """Tokens already in a KV cache (new cache objects or legacy tuples); 0 for none."""
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


def weight_fingerprint(module: nn.Module, path: str, model: nn.Module) -> dict[str, Any]:
    """Identifies the weight the edits were made against."""
    weight = module.weight.detach().float().cpu().contiguous()
    return {
        "model_type": getattr(model.config, "model_type", None),
        "target_module": path,
        "shape": list(weight.shape),
        "sha256": hashlib.sha256(weight.numpy().tobytes()).hexdigest(),
    }


def check_fingerprint(current: dict[str, Any], saved: dict[str, Any], where: Any) -> None:
    """Refuse edits made against another model or layer, naming what differs."""
    for key in ("model_type", "target_module", "shape", "sha256"):
        if current.get(key) != saved.get(key):
            raise ValueError(
                f"{where} was saved for a different model or layer: {key} is "
                f"{saved.get(key)!r} there but {current.get(key)!r} here"
            )


@contextmanager
def editing_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and frozen model parameters while an edit trains, restored
    afterwards: gradients flow only into the tensors the method trains."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
