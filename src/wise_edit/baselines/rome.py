"""ROME (Meng et al., 2022): one fact, one rank-one update of one FFN value matrix.

The key k* is the value matrix's input at the subject's last token, averaged over the
prompt behind each context prefix (`rome/compute_u.py`); v* is the raw prompt's output
there plus the δ of the short optimisation of `locate.LocateEditor._fit_value`
(`rome/compute_v.py`); the update is `closed_form.rome_update` with C from `layer_stats`
(ROME section 3.1), along C^-1 k* and, as in the reference code, scaled so that the raw
prompt's own key k is mapped to v* (W' k = v*: the edited prompt gets exactly the value
that was optimised for it).
Sequential edits add one rank-one update each to the same matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .closed_form import rome_update
from .locate import LocateConfig, LocateEditor, Plan


@dataclass
class ROMEConfig(LocateConfig):
    """ROME as the WISE paper's Table 2 ran it on LLaMA-2-7B (EasyEdit's
    hparams/ROME/llama-7b.yaml, the reference code's compute_v with LLaMA settings): layer
    5 of 32, kept as a relative depth (layer 4 of SmolLM2's 30), v_lr 0.5, 25 steps,
    v_weight_decay 1e-3, clamp_norm_factor 4, kl_factor 0.0625, context templates 10 of 5
    and 10 of 10 tokens. The reference's GPT-J file (hparams/ROME/EleutherAI_gpt-j-6B.json)
    has 20 steps and v_weight_decay 0.5: on SmolLM2 that penalty holds v* back before the
    raw prompt, the one of the 21 rows that is scored, says the target (see
    docs/results.md, "ROME/MEMIT against the reference code"). C weighs the update as in
    the ROME paper (EasyEdit's LLaMA file turns that off)."""

    relative_depth: ClassVar[float] = 5 / 32

    max_steps: int = field(default=25, metadata={"help": "Steps of v* at most (v_num_grad_steps)."})
    value_decay: float = field(
        default=1e-3,
        metadata={"help": "Weight of the penalty ||δ|| / ||v_0||^2 on v* (v_weight_decay)."},
    )


class ROMEEditor(LocateEditor):
    """ROME on one FFN value matrix: each edit a rank-one update."""

    method = "ROME"
    config_class = ROMEConfig

    def _value_site(self) -> nn.Module:
        return self.layer  # v* is the value matrix's output (the MLP's)

    def _solve(self, plans: Sequence[Plan], values: torch.Tensor) -> dict[str, Any]:
        """u = C^-1 k* with k* the mean key over the rows (`rome/compute_u.py`); the update
        writes v* at the raw prompt's own key, whose output v* was optimised from
        (`rome/compute_v.py`: ``(v* - W k) / (k . u)``), so W' k = v* for that prompt."""
        if len(plans) != 1:
            raise ValueError("ROME edits one fact at a time")
        index = self.layer_index
        keys = self._row_keys(plans[0], index)  # (R, I), row 0 the raw prompt
        key, raw = keys.mean(0), keys[0]
        residual = values[:, 0] - self._outputs(index, raw[:, None])[:, 0]  # v* - W k, = δ
        update = rome_update(key, residual, self.key_stats(index).moment, at=raw)
        return {"deltas": {index: self.layer.delta + update.to(self.layer.delta.dtype)}}
