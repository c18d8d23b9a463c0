"""wise-edit: lifelong knowledge editing of Hugging Face causal LMs with WISE."""

from .config import WiseConfig
from .editor import EditResult, WiseEditor
from .layer import SideMemory, WiseLayer

__all__ = ["EditResult", "SideMemory", "WiseConfig", "WiseEditor", "WiseLayer"]
__version__ = "0.1.0"
