"""The MEND editor: one gradient of the edit's target NLL at the current weights, turned
into a weight change by the editor network, added to the value matrix for good.

Like FT-L it edits the main memory unrouted (every input sees every edit), and keeps the
change beside the original weight (`DeltaLayer`), so `detach()` gives back the unedited
model exactly. Sequential edits each start from the weights the earlier ones left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...core.draft import Draft, EditRequest, EditResult
from ...core.editor import EditorBase
from ...core.fastpath import Captured
from ...core.fit import Fitted
from ...core.persistence import Saved
from ...core.prompts import PromptFormat
from ...core.rows import EditRows
from ...core.validate import SaveChecker
from ...families import get_submodule, weight_out_in
from .. import finetune
from . import store
from .config import MendConfig
from .network import EditorNetwork, token_factors

NETWORK_PREFIX = "network."
"""The editor network's tensors in a save, beside ``delta``: a save is self-contained,
so it can be reloaded and continued where the cache lacks the network."""


class MendLayer(finetune.DeltaLayer):
    """`DeltaLayer` that can also read an edit's gradient: with a trial state
    ``(delta, probe)``, ``probe`` (B, T, out; zeros that require grad) is added to the
    output, so the loss's gradient with respect to ``probe`` is its gradient with respect
    to the layer's output at every token, the delta_t of MEND's factorisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trial = self._trial
        if not isinstance(trial, tuple):
            return super().forward(x)
        delta, probe = trial
        base = self.base_layer(x)
        return base + (x.float() @ delta.t()).to(base.dtype) + probe.to(base.dtype)


class _MendDraft(Draft):
    """An edit's weight change ``step``, on top of the committed change ``before``;
    filled in once by `MendEditor._fit` (MEND takes no optimisation steps)."""

    def __init__(self, before: torch.Tensor) -> None:
        self.before = before
        self.step = torch.zeros_like(before)

    def layer_state(self) -> torch.Tensor:
        return self.before + self.step

    def update(self, loss: torch.Tensor) -> None:
        raise NotImplementedError("MEND's edit is one transformed gradient, not a loop")


class MendEditor(EditorBase):
    """Lifelong editing with MEND at one FFN value matrix.

    ``network``: the editor network to edit with; None takes the one ``config.network``
    names (the trained network of the cache, the identity network, or a folder). A save
    holds its network, so `from_pretrained` passes it here."""

    method = "MEND"
    config_class = MendConfig
    layer_class = MendLayer
    routes = False
    route_unit = "edited weights"
    layer: MendLayer
    config: MendConfig

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: MendConfig | None = None,
        irrelevant_prompts: Any = None,
        *,
        network: EditorNetwork | None = None,
        network_info: dict[str, Any] | None = None,
    ) -> None:
        config = config if config is not None else MendConfig.for_model(model)
        target = get_submodule(model, config.resolve_target(model))
        out_dim, in_dim = weight_out_in(target).shape
        fields = None
        if network is None and config.network != "identity":
            fields = network_fields(model, config, tokenizer)  # hashed before attaching
        super().__init__(model, tokenizer, config, irrelevant_prompts)
        try:
            if network is None:
                network, network_info = self._resolve_network(fields, in_dim, out_dim)
        except BaseException:
            self.detach()
            raise
        self.network = network.to(self.device).eval()
        self.network.requires_grad_(False)
        self.network_info = network_info or {"source": "given"}

    def _resolve_network(
        self, fields: dict[str, Any] | None, in_dim: int, out_dim: int
    ) -> tuple[EditorNetwork, dict[str, Any]]:
        """The network ``config.network`` names, and where it came from (for the save)."""
        cfg = self.config
        if cfg.network == "identity":
            network = EditorNetwork(in_dim, out_dim, cfg.rank, cfg.lr, cfg.seed)
            return network, {"source": "identity"}
        assert fields is not None
        if cfg.network == "trained":
            folder = store.cache_folder(fields)
            if store.read_meta(folder) is None:
                raise FileNotFoundError(
                    f"no trained MEND editor network for this model, layer and prompt format "
                    f"in {folder}; train one with `wise-edit train-mend --model ...` (or "
                    "`--set network=identity` for the untrained network: a plain gradient step)"
                )
        else:
            folder = Path(cfg.network).expanduser()
        network, meta = store.load_network(folder, fields, in_dim, out_dim)
        return network, {"source": str(folder), "trained_steps": meta.get("steps")}

    # ------------------------------------------------------------------ editing
    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> _MendDraft:
        return _MendDraft(self.layer.delta.clone())

    def _fit(self, draft: Draft, rows: EditRows, lower: Captured) -> Fitted:
        """MEND's edit: the gradient at the committed weights, transformed once; then one
        forward with the edit to report whether the answer is now right."""
        assert isinstance(draft, _MendDraft)
        loss, factors = self.gradient_factors(rows, lower, draft.before)
        with torch.no_grad():
            step = self.network.weight_update(*factors)
        _finite(step.abs().max(), "the editor network's weight change")
        draft.step = step
        with torch.no_grad(), self.layer.trial(draft.layer_state()):
            after, answered = self._target_fit(rows, lower)
        _finite(after, "the edit loss after the edit")
        value = after.item()
        return Fitted(1, value, value, answered_at=1 if bool(answered) else None)

    def gradient_factors(
        self, rows: EditRows, lower: Captured, delta: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The rows' target NLL with the layer's change ``delta``, and its gradient with
        respect to the edited weight as per-token factors (u (N, in), delta (N, out)):
        u is the layer's input (captured once, frozen below), delta the gradient at the
        layer's output, read through the `MendLayer` probe."""
        out_dim = self.layer.weight.shape[0]
        probe = torch.zeros(
            *rows.input_ids.shape, out_dim, device=self.device, requires_grad=True
        )  # (B, T, out)
        with self.layer.trial((delta, probe)):
            loss, _ = self._target_fit(rows, lower)
        _finite(loss, "the edit loss")
        (grads,) = torch.autograd.grad(loss, probe)
        return loss.detach(), token_factors(lower.acts, grads, rows.attention_mask)

    def _commit(self, draft: Draft, result: EditResult) -> None:
        assert isinstance(draft, _MendDraft)
        self.layer.delta.copy_(draft.before + draft.step)

    def summary(self) -> dict[str, Any]:
        delta = self.layer.delta
        return {
            "max_abs_change": float(delta.abs().max()),
            "edit_lr": float(self.network.edit_lr),
            **super().summary(),
        }

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"network": self.network_info}

    def _tensors(self) -> dict[str, torch.Tensor]:
        network = {NETWORK_PREFIX + k: v for k, v in self.network.state_dict().items()}
        return {"delta": self.layer.delta, **network}

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: MendConfig, weight: torch.Tensor
    ) -> None:
        check.field(state, "network", dict)
        check.tensor("delta", weight.shape)
        out_dim, in_dim = weight.shape
        for name, shape in EditorNetwork(in_dim, out_dim, config.rank).shapes().items():
            check.tensor(NETWORK_PREFIX + name, shape)

    @classmethod
    def _from_saved(
        cls, model: nn.Module, tokenizer: Any, config: Any, irrelevant_prompts: Any, saved: Saved
    ) -> MendEditor:
        """The editor of a checked save, editing with the save's own network."""
        delta = saved.tensors["delta"]
        network = EditorNetwork(delta.shape[1], delta.shape[0], config.rank)
        network.load_state_dict(
            {k[len(NETWORK_PREFIX) :]: v for k, v in saved.tensors.items() if k != "delta"}
        )
        editor = cls(
            model,
            tokenizer,
            config,
            irrelevant_prompts,
            network=network,
            network_info=saved.state["network"],
        )
        editor.edit_log = saved.state["edit_log"]
        editor._restore(saved.state, saved.tensors)
        return editor

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.layer.delta.copy_(tensors["delta"])


def network_fields(model: nn.Module, config: MendConfig, tokenizer: Any) -> dict[str, Any]:
    """What a trained network is tied to (`store.KEY_FIELDS`) for ``model`` (no editor
    attached) edited with ``config``: the model's weights, the edited module, the prompt
    format edits are written in and whether targets end with the stop token (both shape
    the gradients the network sees), and the network's rank."""
    return {
        "model_sha256": store.model_sha256(model),
        "target_module": config.resolve_target(model),
        "prompt_format": PromptFormat.create(tokenizer, config.prompt_format).kind,
        "train_stop": config.train_stop,
        "rank": config.rank,
    }


def _finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{what} became {value.item()}; the edit was not applied")
