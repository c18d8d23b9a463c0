"""The one place that knows where each model family keeps its FFN value matrix.

WISE edits the second (value, "down") projection of one FFN block. Every family
names its decoder stack and that projection differently; everything else in
wise-edit asks this module instead of hard-coding a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

# The paper edits layer 27 of LLaMA-2-7B's 32 layers; other depths keep that ratio.
PAPER_RELATIVE_DEPTH = 27 / 32


@dataclass(frozen=True)
class Family:
    """Where a family keeps its decoder layers and, inside one, the value projection."""

    layers: str
    value_proj: str
    conv1d: bool = False  # GPT-2 stores weights as (in, out) in a Conv1D module


FAMILIES: MappingProxyType[str, Family] = MappingProxyType(
    {
        "llama": Family("model.layers", "mlp.down_proj"),
        "mistral": Family("model.layers", "mlp.down_proj"),
        "qwen2": Family("model.layers", "mlp.down_proj"),
        "qwen3": Family("model.layers", "mlp.down_proj"),
        "gemma3_text": Family("model.layers", "mlp.down_proj"),
        "gemma3": Family("model.language_model.layers", "mlp.down_proj"),
        "phi3": Family("model.layers", "mlp.down_proj"),
        "gpt2": Family("transformer.h", "mlp.c_proj", conv1d=True),
        "gptj": Family("transformer.h", "mlp.fc_out"),
        "gpt_neox": Family("gpt_neox.layers", "mlp.dense_4h_to_h"),
    }
)


def family_of(model: nn.Module) -> Family:
    """The family entry for ``model``; a clear error for families we have not mapped."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not a supported family; supported: "
            f"{', '.join(sorted(FAMILIES))}. Pass WiseConfig(target_module=...) and "
            "optionally layers_path=... to edit another architecture."
        )
    return FAMILIES[model_type]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error message that names the bad path."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"target_module: {path!r} does not exist in {type(root).__name__}"
        ) from err


def decoder_layers(model: nn.Module, layers_path: str) -> nn.ModuleList:
    layers = get_submodule(model, layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"layers_path: {layers_path!r} is a {type(layers).__name__}, not a ModuleList"
        )
    return layers


def infer_layers_path(model: nn.Module, target_module: str) -> str:
    """The decoder stack a ``target_module`` outside the family table lies in: the
    deepest ModuleList on its path that is followed by a layer index."""
    parts = target_module.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if not parts[cut].isdigit():
            continue
        prefix = ".".join(parts[:cut])
        try:
            candidate = model.get_submodule(prefix)
        except AttributeError:
            continue
        if isinstance(candidate, nn.ModuleList):
            return prefix
    raise ValueError(
        f"target_module: {target_module!r} is not inside a list of decoder layers; "
        "pass layers_path=... as well"
    )


def default_layer_index(num_layers: int) -> int:
    """The layer at the paper's relative depth (27 of 32), rounded down."""
    return min(num_layers - 1, int(num_layers * PAPER_RELATIVE_DEPTH))


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: weight (in, out), forward x @ W + b. Decided from the type, once."""
    return type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The value matrix in nn.Linear layout (out, in), whatever module holds it."""
    return module.weight.t() if is_conv1d(module) else module.weight


def check_value_module(module: nn.Module, path: str) -> None:
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ValueError(
            f"target_module: {path!r} is a {type(module).__name__}; WISE edits a linear value "
            "projection (nn.Linear or GPT-2 Conv1D)"
        )
