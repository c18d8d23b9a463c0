"""wise-edit: lifelong knowledge editing of Hugging Face causal LMs with WISE."""

from .core.draft import Draft, Editor, EditResult
from .core.editor import EditorBase
from .methods import METHODS, editor_class, load_editor
from .wise import SideMemory, WiseConfig, WiseEditor, WiseLayer

__all__ = [
    "METHODS",
    "Draft",
    "EditResult",
    "Editor",
    "EditorBase",
    "SideMemory",
    "WiseConfig",
    "WiseEditor",
    "WiseLayer",
    "editor_class",
    "load_editor",
]
__version__ = "0.2.0"
