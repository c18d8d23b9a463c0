"""WISE (NeurIPS 2024), laid out like a peft tuner, one file per idea of the paper:
`config` (every setting, nested by idea), `memory` (one side memory), `layer` (the
wrapper that serves the memories), `router` (scores, the margin loss, every routing
rule), `shards` (masks, the masked update, the merge of a group) with `merging` (TIES and
the other merges), `bank` (where edits go: Merge and Retrieve, replay, rehearsal),
`negatives` (the margin loss's unrelated prompts), `calibration` (measured once per
model), `draft` (what one edit trains) and `editor` (the editor that ties them)."""

from .calibration import Calibration
from .config import (
    MemoryConfig,
    NegativesConfig,
    PrefixConfig,
    RoutingConfig,
    ShardConfig,
    WiseConfig,
    preset_for_matrix,
)
from .editor import WiseEditor
from .layer import WiseLayer
from .memory import SideMemory

__all__ = [
    "Calibration",
    "MemoryConfig",
    "NegativesConfig",
    "PrefixConfig",
    "RoutingConfig",
    "ShardConfig",
    "SideMemory",
    "WiseConfig",
    "WiseEditor",
    "WiseLayer",
    "preset_for_matrix",
]
