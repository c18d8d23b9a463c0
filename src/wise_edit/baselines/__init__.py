"""The paper's baselines, on the same interface and harness as WISE: FT-L and FT-EWC
(edit the main memory), GRACE and DEFER (retrieval-style working memory)."""

from .defer import DeferConfig, DeferEditor, DeferLayer
from .finetune import DeltaLayer, FTEWCConfig, FTEWCEditor, FTLConfig, FTLEditor
from .grace import Codebook, GraceConfig, GraceEditor, GraceLayer, Placement

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
    "Placement",
]
