"""The paper's baselines, on the same interface and harness as WISE: FT-L, FT-EWC and
MEND (edit the main memory), GRACE and DEFER (retrieval-style working memory), and the
locate-then-edit methods ROME, MEMIT, MEMIT-MASS and AlphaEdit (closed-form updates of
FFN value matrices)."""

from .defer import DeferConfig, DeferEditor, DeferLayer
from .finetune import DeltaLayer, FTEWCConfig, FTEWCEditor, FTLConfig, FTLEditor
from .grace import Codebook, GraceConfig, GraceEditor, GraceLayer, Placement
from .locate import LocateConfig, LocateEditor
from .memit import (
    AlphaEditConfig,
    AlphaEditEditor,
    MEMITConfig,
    MEMITEditor,
    MEMITMassConfig,
    MEMITMassEditor,
)
from .mend import MendConfig, MendEditor, MendTraining
from .rome import ROMEConfig, ROMEEditor

__all__ = [
    "AlphaEditConfig",
    "AlphaEditEditor",
    "Codebook",
    "DeferConfig",
    "DeferEditor",
    "DeferLayer",
    "DeltaLayer",
    "FTEWCConfig",
    "FTEWCEditor",
    "FTLConfig",
    "FTLEditor",
    "GraceConfig",
    "GraceEditor",
    "GraceLayer",
    "MendConfig",
    "MendEditor",
    "MendTraining",
    "LocateConfig",
    "LocateEditor",
    "MEMITConfig",
    "MEMITEditor",
    "MEMITMassConfig",
    "MEMITMassEditor",
    "Placement",
    "ROMEConfig",
    "ROMEEditor",
]
