"""WISE (NeurIPS 2024), laid out like a peft tuner: `config` (every knob), `layer` (the
side memories and routing in forward), `router` (activation score, margin loss,
threshold, top-1 route), `masks` (knowledge sharding), `merging` (TIES and the other
merges), `editor` (where each edit goes, its loss, commit and merge)."""

from .config import WiseConfig, preset_for_matrix
from .editor import WiseEditor
from .layer import SideMemory, WiseLayer

__all__ = ["SideMemory", "WiseConfig", "WiseEditor", "WiseLayer", "preset_for_matrix"]
