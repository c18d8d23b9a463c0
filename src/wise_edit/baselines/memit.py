"""MEMIT (Meng et al., 2023), MEMIT-MASS and AlphaEdit (Fang et al., 2025): the
least-squares update of a range of FFN value matrices, for many edits at once.

For a batch of edits: v* (here z) is the residual stream after the last edited layer
at each subject's last token (`memit/compute_z.py`); then, layer by layer from the
lowest, the keys K at that layer (`memit/compute_ks.py`) and what is still missing at the
last layer, R = z - h, shared out over the layers left (R / (L - i)), give that layer's
update (`closed_form.memit_update`, MEMIT section 4.3 and Algorithm 1); each layer's
update is in place when the next layer's keys are read. MEMIT runs edits one batch of
``batch_size`` at a time, each on top of the ones before (sequential editing);
MEMIT-MASS is MEMIT given the whole stream as one batch (the WISE paper's row).
AlphaEdit solves each layer's update in the null space of the preserved keys and keeps
the earlier edits' keys (`closed_form.alphaedit_update`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import fastpath
from ..core.validate import SaveChecker
from .closed_form import alphaedit_update, memit_update, null_space_projection
from .locate import LocateConfig, LocateEditor, Plan

# MEMIT's λ (hparams/MEMIT/*: mom2_update_weight) and the input width of GPT-J's value
# matrix, the model it was chosen on
MOMENT_WEIGHT = 15000.0
MOMENT_WEIGHT_INPUTS = 16384


@dataclass
class SpanConfig(LocateConfig):
    """A range of ``span`` layers ending at ``layer`` and the batch size; v* as in
    hparams/MEMIT/EleutherAI_gpt-j-6B.json (v_lr 0.5, 25 steps, clamp_norm_factor 0.75,
    kl_factor 0.0625, v_weight_decay 0.5) with MEMIT's context templates (5 of 10
    tokens, `memit_main.get_context_templates`). The default range keeps LLaMA's layers
    4-8 of 32 (MEMIT and AlphaEdit on LLaMA-3-8B, EasyEdit's MEMIT on LLaMA-2-7B) as
    relative depths: SmolLM2's layers 3-7 of 30. These are the early-middle MLPs that
    MEMIT's causal traces find recalling facts at the subject's last token, not WISE's
    late layer: the method is run where it was designed to work."""

    relative_depth: ClassVar[float] = 8 / 32

    lr: float = field(default=0.5, metadata={"help": "Adam step size of z (v_lr)."})
    max_steps: int = field(default=25, metadata={"help": "Steps of z at most (v_num_grad_steps)."})
    clamp_norm_factor: float = field(
        default=0.75, metadata={"help": "||δ|| is kept within this times ||z_0||."}
    )
    context_count: int = field(default=5, metadata={"help": "Context prefixes (MEMIT: 5)."})
    context_lengths: tuple[int, ...] = field(
        default=(10,), metadata={"help": "Token lengths of the prefixes (MEMIT: 10)."}
    )
    span: int = field(
        default=5, metadata={"help": "Edited layers: this many, ending at `layer` (MEMIT: 5)."}
    )
    batch_size: int | None = field(
        default=1,
        metadata={
            "help": "Edits solved together by `edit_many` (None: all of them in one batch); "
            "1 is sequential editing, one update per edit."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("span", self.span >= 1, "must be >= 1"),
                ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be >= 1"),
            ]
        )

    def edited_layers(self, last: int) -> list[int]:
        return list(range(max(0, last - self.span + 1), last + 1))


@dataclass
class MEMITConfig(SpanConfig):
    """MEMIT as the WISE paper's Table 2 ran it on LLaMA-2-7B (EasyEdit's
    hparams/MEMIT/llama-7b.yaml): v* as ROME's there (v_lr 0.5, 25 steps, v_weight_decay
    1e-3, clamp_norm_factor 4, kl_factor 0.0625), and λ 15000 kept per input dimension
    (`resolved_moment_weight`: 1406 on SmolLM2, 10078 on LLaMA-2-7B). λ = 15000 itself
    left SmolLM2's answer unchanged, in the reference code as here (docs/results.md)."""

    value_decay: float = field(
        default=1e-3,
        metadata={"help": "Weight of the penalty ||δ|| / ||v_0||^2 on v* (v_weight_decay)."},
    )
    clamp_norm_factor: float = field(
        default=4.0, metadata={"help": "||δ|| is kept within this times ||z_0||."}
    )

    moment_weight: float | None = field(
        default=None,
        metadata={
            "help": "λ, the weight of the preserved keys' second moment C against the new "
            "keys (mom2_update_weight). None: 15000 (GPT-J's and LLaMA's) per 16384 input "
            "dimensions of the value matrix, GPT-J's, where it was set."
        },
    )

    def resolved_moment_weight(self, inputs: int) -> float:
        """λ for a value matrix of ``inputs`` input dimensions. C is a mean over tokens,
        spread over as many directions as the matrix has inputs, while one new key's
        k k^T is not: at a fixed λ a narrower matrix weighs C above the edit (on SmolLM2,
        1536 inputs, λ = 15000 left the answer unchanged, the reference code's too)."""
        if self.moment_weight is not None:
            return self.moment_weight
        return MOMENT_WEIGHT * inputs / MOMENT_WEIGHT_INPUTS

    def __post_init__(self) -> None:
        super().__post_init__()
        weight = self.moment_weight
        self._validate([("moment_weight", weight is None or weight > 0, "must be None or > 0")])


@dataclass
class MEMITMassConfig(MEMITConfig):
    """MEMIT given the whole stream as one batch."""

    batch_size: int | None = field(
        default=None, metadata={"help": "Edits solved together (None: all of them)."}
    )


@dataclass
class AlphaEditConfig(SpanConfig):
    """AlphaEdit's settings (hparams/AlphaEdit/Llama3-8B.json: layers 4-8, v_lr 0.1,
    25 steps, clamp_norm_factor 0.75, nullspace_threshold 2e-2, L2 10)."""

    lr: float = field(default=0.1, metadata={"help": "Adam step size of z (v_lr)."})
    nullspace_threshold: float = field(
        default=2e-2,
        metadata={
            "help": "Eigenvectors of C with an eigenvalue below this span the null space "
            "updates are projected on (an absolute value, as in the reference; the number "
            "kept is in the editor's summary)."
        },
    )
    l2: float = field(default=10.0, metadata={"help": "α, the ridge of the solve (L2)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("nullspace_threshold", self.nullspace_threshold > 0, "must be > 0"),
                ("l2", self.l2 > 0, "must be > 0"),
            ]
        )


class MEMITEditor(LocateEditor):
    """MEMIT over a range of FFN value matrices; sequential batches of ``batch_size``."""

    method = "MEMIT"
    config_class = MEMITConfig
    config: SpanConfig

    def _value_site(self) -> nn.Module:
        return self.layers[self.layer_index]  # z: the residual stream after the last layer

    def _solve(self, plans: Sequence[Plan], values: torch.Tensor) -> dict[str, Any]:
        new = {i: self.deltas[i].delta.clone() for i in self.edited}
        for step, index in enumerate(self.edited):
            with self._trials(new):
                keys = self._keys(plans, index, grouped=True)  # (I, n)
                residual = (values - self._last_states(plans)) / (len(self.edited) - step)
            new[index] += self._layer_update(index, keys, residual).to(new[index].dtype)
        return {"deltas": new}

    def _layer_update(self, index: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        stats = self.key_stats(index)
        weight = self.config.resolved_moment_weight(stats.moment.shape[0])  # type: ignore[attr-defined]
        return memit_update(keys, residual, stats.moment, weight)

    @torch.no_grad()
    def _last_states(self, plans: Sequence[Plan]) -> torch.Tensor:
        """The residual stream after the last edited layer at each edit's lookup token in
        its raw prompt, as the model computes now (H, n)."""
        states = []
        for plan in plans:
            ids, mask = plan.rows.input_ids[:1], plan.rows.attention_mask[:1]
            out = fastpath.layer_output(
                self.model.base_model, self.layers, self.layer_index + 1, ids, mask
            )
            states.append(out[0, plan.positions[0]].double())
        return torch.stack(states, dim=1)


class MEMITMassEditor(MEMITEditor):
    """MEMIT-MASS: `edit_many` writes the whole stream in one batch."""

    method = "MEMIT-MASS"
    config_class = MEMITMassConfig


class AlphaEditEditor(MEMITEditor):
    """AlphaEdit: MEMIT's update in the null space of the preserved keys, with the keys
    of every earlier edit (``prior``, K_p K_p^T per layer) kept out of its way."""

    method = "AlphaEdit"
    config_class = AlphaEditConfig
    config: AlphaEditConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        width = self.layer.weight.shape[1]
        self.prior = {i: torch.zeros(width, width, device=self.device) for i in self.edited}
        self._projections: dict[int, torch.Tensor] = {}

    def projection(self, index: int) -> torch.Tensor:
        """P of layer ``index`` (I, I), fp64 (`closed_form.null_space_projection`)."""
        if index not in self._projections:
            stats = self.key_stats(index)
            p = null_space_projection(
                stats.eigenvalues, stats.eigenvectors, self.config.nullspace_threshold
            )
            self._projections[index] = p.to(self.device)
        return self._projections[index]

    def _layer_update(self, index: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return alphaedit_update(
            keys, residual, self.projection(index), self.prior[index], self.config.l2
        )

    def _solve(self, plans: Sequence[Plan], values: torch.Tensor) -> dict[str, Any]:
        update = super()._solve(plans, values)
        prior = {}
        with self._trials(update["deltas"]):  # the edits' keys once every layer is updated
            for index in self.edited:
                keys = self._keys(plans, index, grouped=True)
                prior[index] = self.prior[index] + (keys @ keys.t()).to(self.prior[index].dtype)
        return {**update, "prior": prior}

    def _commit_update(self, update: dict[str, Any]) -> None:
        super()._commit_update(update)
        for index, prior in update["prior"].items():
            self.prior[index].copy_(prior)

    def summary(self) -> dict[str, Any]:
        threshold = self.config.nullspace_threshold
        kept = {  # only layers whose C is loaded: a summary measures nothing
            str(i): int((stats.eigenvalues < threshold).sum()) for i, stats in self._stats.items()
        }
        return {"null_space_dims": kept, **super().summary()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._tensors(), **{f"prior.{i}": self.prior[i] for i in self.edited}}

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: Any, weight: torch.Tensor
    ) -> None:
        super()._check_saved(check, state, config, weight)
        width = weight.shape[1]
        for index in state["layers"]:
            check.tensor(f"prior.{index}", (width, width))

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        super()._restore(state, tensors)
        for index in self.edited:
            self.prior[index].copy_(tensors[f"prior.{index}"])
