"""Reading what older versions of wise-edit wrote, in one place: saves by their
``format_version``, and the flat setting names (``--set alpha=0.3``) that WISE's nested
config replaced (``--set routing.alpha=0.3``).

Format versions:
1. per-method file names (``wise_config.json``, ...; `persistence.LEGACY_FILES`);
2. the fixed file names, a flat config, WISE memories as ``memory.{i}.*`` tensors with
   one tensor per mask and per shard;
3. WISE's nested config, and its memories as their ``state_dict`` (``memories.{i}.*``).
Saves of versions 1-2 were written while settings were being added, so their configs
lack fields that did not exist yet: each gets the value those saves' edits were made
with (`MADE_WITHOUT`), never today's default.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .core.config import Checked, flatten

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3

# WISE's flat names of versions 1-2 (and of `--set` before the nested config)
WISE_RENAMED = {
    "mode": "memory.mode",
    "norm_bound": "memory.norm_bound",
    "replay": "memory.replay",
    "replay_rows": "memory.replay_rows",
    "rehearse_rows": "memory.rehearse_rows",
    "mask_ratio": "shards.mask_ratio",
    "shard_size": "shards.size",
    "shards_per_merge": "shards.per_merge",
    "merge_method": "shards.merge_method",
    "merge_density": "shards.merge_density",
    "alpha": "routing.alpha",
    "beta": "routing.beta",
    "gamma": "routing.gamma",
    "score_scale": "routing.score_scale",
    "threshold_ratio": "routing.threshold_ratio",
    "margin_weight": "routing.margin_weight",
    "route_candidates": "routing.candidates",
    "key_radius": "routing.key_radius",
    "subject_tau": "routing.subject_tau",
    "subject_layer": "routing.subject_layer",
    "irrelevant_rows": "negatives.random",
    "hard_negatives": "negatives.hard",
    "prefix_count": "prefixes.count",
    "prefix_lengths": "prefixes.lengths",
}
# Settings that were removed (experiments that lost, internal budgets now constants),
# with the one value the code still implements.
RETIRED = {
    "momentum": 0.0,
    "subject_negatives": 0,
    "hard_negative_candidates": 256,
    "prefix_top_k": 5,
    "side_steps_lm": 0.05,
}
# Fields added while format 2 was current, with the value older saves were made with.
MADE_WITHOUT = {"prompt_format": "raw", "train_stop": False}
WISE_MADE_WITHOUT = {
    "rehearse_rows": 0,  # before rehearsal
    "route_candidates": 0,  # before the retrieval index: every memory scored
    "key_radius": 0.0,  # before the key radius
    "subject_tau": 0.0,  # before the subject gate
    "side_steps": 0,  # before side steps
}


def renamed(config_class: type[Checked]) -> dict[str, str]:
    """Old flat name -> dotted name, for configs that nest groups (WISE)."""
    return WISE_RENAMED if config_class.groups() else {}


def canonical_settings(config_class: type[Checked], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` settings (field names, dotted names, group objects or dicts, old flat
    names) as dotted names of ``config_class``; a retired setting other than its one
    value, or an unknown name, is a ValueError naming the known ones."""
    flat: dict[str, Any] = {}
    for name, value in given.items():
        if isinstance(value, Checked):
            value = value.to_dict()
        if isinstance(value, dict) and name in config_class.groups():
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    known = set(config_class.setting_names())
    old = renamed(config_class)
    out: dict[str, Any] = {}
    for name, value in flat.items():
        if name in RETIRED:
            if value != RETIRED[name]:
                raise ValueError(
                    f"{name} was removed; only {RETIRED[name]!r} (what the code does) is accepted"
                )
            continue
        name = old.get(name, name)
        if name not in known:
            names = ", ".join(sorted(known))
            raise ValueError(f"unknown {config_class.__name__} setting {name!r} (known: {names})")
        out[name] = value
    return out


def upgrade_config(method: str, config: dict[str, Any], version: int) -> dict[str, Any]:
    """A config as written by format ``version``, as today's `to_dict` writes it."""
    if version >= FORMAT_VERSION:
        return config
    config = dict(config)
    for name, value in MADE_WITHOUT.items():
        config.setdefault(name, value)
    if method == "WISE":
        # saves from before `optimizer` existed were trained with SGD at their lr
        if "optimizer" not in config and "lr" in config:
            config["optimizer"] = "sgd"
        for name, value in WISE_MADE_WITHOUT.items():
            config.setdefault(name, value)
    out: dict[str, Any] = {}
    for name, value in config.items():
        if name in RETIRED:
            if value != RETIRED[name]:
                logger.warning(
                    "the save was made with %s=%r, which was removed; further edits use %r",
                    name,
                    value,
                    RETIRED[name],
                )
            continue
        target = WISE_RENAMED.get(name, name) if method == "WISE" else name
        *group, leaf = target.split(".")
        (out.setdefault(group[0], {}) if group else out)[leaf] = value
    return out


def upgrade_state(
    method: str, state: dict[str, Any], tensors: dict[str, torch.Tensor], version: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A save's state and tensors as written by format ``version``, in today's layout.
    WISE memories of versions 1-2: ``memory.{i}.mask.{j}`` / ``.shard.{j}`` become one
    ``masks`` and one ``shard_values`` tensor per memory; keys a save predates stay
    missing, and the editor derives them from the edit log."""
    if version >= FORMAT_VERSION or method != "WISE" or not isinstance(state.get("memories"), list):
        return state, tensors
    tensors = dict(tensors)
    memories = []
    for i, meta in enumerate(state["memories"]):
        if not isinstance(meta, dict) or f"memory.{i}.delta" not in tensors:
            return state, tensors  # malformed: left for the save checks to name
        old = f"memory.{i}"
        delta = tensors.pop(f"{old}.delta")
        masks = [tensors.pop(f"{old}.mask.{j}", None) for j in range(int(meta.get("masks", 0)))]
        shards = [tensors.pop(f"{old}.shard.{j}", None) for j in range(int(meta.get("shards", 0)))]
        if any(t is None for t in masks + shards):
            return state, {**tensors, f"{old}.delta": delta}
        new = f"memories.{i}"
        tensors[f"{new}.delta"] = delta
        for name in ("keys", "subject_keys"):
            if f"{old}.{name}" in tensors:
                tensors[f"{new}.{name}"] = tensors.pop(f"{old}.{name}")
        empty = torch.zeros((0, *delta.shape), dtype=torch.bool)
        tensors[f"{new}.masks"] = torch.stack(masks) if masks else empty
        tensors[f"{new}.shard_values"] = torch.cat(shards) if shards else torch.zeros(0)
        sizes = [len(s) for s in shards]
        memories.append({k: v for k, v in meta.items() if k != "shards"} | {"shard_sizes": sizes})
    return {**state, "memories": memories}, tensors
