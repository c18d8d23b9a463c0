"""MEND (Mitchell et al. 2022): an editor network, trained beforehand, that turns the
fine-tuning gradient of an edit into a weight change. `config` holds the settings,
`network` the editor network and the gradient's factorisation, `editor` the editor,
`training` how the network is trained, `store` where trained networks are cached."""

from .config import MendConfig, MendTraining
from .editor import MendEditor, MendLayer
from .network import EditorNetwork, factored_gradient, token_factors

__all__ = [
    "EditorNetwork",
    "MendConfig",
    "MendEditor",
    "MendLayer",
    "MendTraining",
    "factored_gradient",
    "token_factors",
]
