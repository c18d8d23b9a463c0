"""The paper's baselines, on the same interface and harness as WISE: FT-L, FT-EWC and
MEND (edit the main memory), GRACE and DEFER (retrieval-style working memory)."""

from .defer import DeferConfig, DeferEditor, DeferLayer
from .finetune import DeltaLayer, FTEWCConfig, FTEWCEditor, FTLConfig, FTLEditor
from .grace import Codebook, GraceConfig, GraceEditor, GraceLayer, Placement
from .mend import MendConfig, MendEditor, MendTraining

__all__ = [
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
    "Placement",
]
