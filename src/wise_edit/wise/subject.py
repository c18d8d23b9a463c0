"""The subject gate's keys (the gate itself is rule 5 of `router.route`).

Each edit that names its subject is keyed by the residual stream after a few low
decoder layers (`routing.subject_layer`) at the subject's last token, centred on neutral
text: low in the model that token still carries the subject rather than its sentence.
A forward hook on that layer hands each forward's states to the wrapped layer, which
reads them when it routes the same call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.attach import editing_mode
from ..core.draft import EditRequest
from ..core.fastpath import hidden_of, layer_output
from ..core.rows import encode_prompts
from ..neutral import NEUTRAL_PROMPTS
from .calibration import DEFAULT_SUBJECT_LAYER, subject_centre
from .router import centred_unit, subject_end


def subject_depth(tau: float, layer: int | None, edited: int) -> int:
    """Decoder layers below the subject key (0: no gate) for the gate's ``tau`` and
    ``layer`` setting, with the edited layer at index ``edited``."""
    if not tau:
        return 0
    if layer is None:
        return min(DEFAULT_SUBJECT_LAYER, edited)
    if layer > edited:
        raise ValueError(
            f"subject_layer: {layer} decoder layers do not lie below the edited layer "
            f"(index {edited}); choose at most {edited}, None or subject_tau=0"
        )
    return layer


class SubjectKeys:
    """The hook that feeds the gate, and the keys of edits, of one editor (``editor``:
    its model, layers, format and wrapped layer)."""

    def __init__(self, editor: Any, depth: int) -> None:
        self.editor, self.depth = editor, depth
        below = editor.layers[depth - 1]
        self._hook = below.register_forward_hook(self._hand_up)

    def remove(self) -> None:
        self._hook.remove()

    def _hand_up(self, _module: nn.Module, _args: Any, output: Any) -> None:
        """This forward's residual stream, for the gate of the same call (per thread,
        like its routing decision)."""
        self.editor.layer.routing.lower = hidden_of(output)

    @torch.no_grad()
    def lower_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The subject layer's states (B, T, H) of a left-padded prompt batch, its routing
        mask and its token ids; only the layers up to the subject layer run."""
        ed = self.editor
        ids, mask = encode_prompts(ed.format, prompts)
        ids, mask = ids.to(ed.device), mask.to(ed.device)
        with editing_mode(ed.model):
            states = layer_output(ed.model.base_model, ed.layers, self.depth, ids, mask)
        return states, ed._routing_mask(ids, mask), ids

    def centre(self) -> torch.Tensor:
        """The subject layer's neutral mean (H,), measured once (`calibration.py`)."""
        states, mask, _ = self.lower_states(list(NEUTRAL_PROMPTS))
        return subject_centre(states, mask)

    def key(self, request: EditRequest, centre: torch.Tensor) -> torch.Tensor | None:
        """The edit's subject key (H,); None when the edit names no subject or its prompt
        does not hold it."""
        if request.subject is None:
            return None
        states, _, ids = self.lower_states([request.prompt])
        at = subject_end(self.editor.tokenizer, ids[0].tolist(), request.subject)
        return None if at is None else centred_unit(states[0, at], centre)
