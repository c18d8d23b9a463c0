"""DEFER: the SERAC-style editor GRACE re-implements and the WISE paper compares with.

At the wrapped layer sit a scope classifier g (a linear probe with a sigmoid on the
last prompt token's input) and a small counterfactual model o (one linear layer of the
wrapped layer's shape). A sequence g accepts is computed by o at that layer, every other
sequence by the original layer. g and o are trained jointly on each edit: o to produce
the target, g to accept the edit prompt and to reject unrelated prompts. Nothing replays
earlier edits, so later edits can overwrite what o and g learned for earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.config import EditConfig
from ..core.draft import Draft, EditRequest, EditResult
from ..core.editor import EditorBase
from ..core.fastpath import Captured
from ..core.fit import adam_update
from ..core.layer import AttachedLayer, last_token, unrouted
from ..core.rows import EditRows
from ..core.validate import SaveChecker

PARAMS = ("gate_weight", "gate_bias", "head_weight", "head_bias")


@dataclass
class DeferConfig(EditConfig):
    """DEFER as the paper runs it (A.3): learning rate 7e-5 (the best of 7e-5, 7e-4, 1e-3
    on LLaMA), GRACE's 100 iterations and 0.5 threshold."""

    lr: float = field(default=7e-5, metadata={"help": "Adam learning rate of g and o."})
    threshold: float = field(
        default=0.5, metadata={"help": "g's probability above which o is used."}
    )
    irrelevant_rows: int = field(
        default=4, metadata={"help": "Unrelated prompts g learns to reject in each edit."}
    )
    early_stop_loss: float = field(
        default=1e-2,
        metadata={"help": "Stop an edit once target NLL + classifier loss is below this."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("threshold", 0.0 < self.threshold < 1.0, "must be in (0, 1)"),
                ("irrelevant_rows", self.irrelevant_rows >= 0, "must be >= 0"),
            ]
        )


def gate_probability(query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """g: probability that a sequence (its last-token query (B, I)) is in an edit's scope."""
    return torch.sigmoid(query.float() @ weight + bias)


class DeferLayer(AttachedLayer):
    """The wrapped linear, a scope classifier and a counterfactual linear.

    o starts as a copy of the wrapped layer, so a sequence g accepts before o has
    learned anything still gets the original output.
    """

    def __init__(self, base_layer: nn.Module, threshold: float = 0.5) -> None:
        super().__init__(base_layer)
        weight = self.weight.detach().float()
        bias = getattr(base_layer, "bias", None)
        out_dim, in_dim = weight.shape
        self.register_buffer("gate_weight", torch.zeros(in_dim, device=weight.device), False)
        self.register_buffer("gate_bias", torch.zeros((), device=weight.device), False)
        self.register_buffer("head_weight", weight.clone(), False)
        self.register_buffer(
            "head_bias",
            bias.detach().float().clone()
            if bias is not None
            else torch.zeros(out_dim, device=weight.device),
            False,
        )
        self.threshold = threshold
        self.trained = False  # until the first edit, every sequence gets the original layer

    def params(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PARAMS}

    def _head(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return x.float() @ params["head_weight"].t() + params["head_bias"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        rows = torch.arange(x.shape[0], device=x.device)
        if self._trial is not None:  # editing: mix o and the layer by g's probability
            params, positions = self._trial
            p = gate_probability(x[rows, positions], params["gate_weight"], params["gate_bias"])
            mixed = p.view(-1, 1, 1) * self._head(x, params) + (1 - p.view(-1, 1, 1)) * base
            return mixed.to(base.dtype)
        if self._disabled or not self.trained:
            return base
        routing = self.routing
        accept = routing.decide(x.shape[0], lambda: self.route(x, routing.mask_for(x))) >= 0
        if not accept.any():
            return base
        out = base.clone()
        out[accept] = self._head(x[accept], self.params()).to(base.dtype)
        return out

    def route(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """0 where g sends the sequence (its last real token) to o, -1 elsewhere."""
        if not self.trained:
            return unrouted(acts)
        p = gate_probability(last_token(acts, token_mask), self.gate_weight, self.gate_bias)
        return torch.where(p >= self.threshold, 0, -1)


class _DeferDraft(Draft):
    """Adam on g and o jointly: the target NLL through o (mixed with the layer by g's
    probability) plus g's cross-entropy on the edit prompt and the unrelated prompts."""

    def __init__(
        self,
        committed: dict[str, torch.Tensor],
        positions: torch.Tensor,
        queries: torch.Tensor,
        labels: torch.Tensor,
        lr: float,
    ) -> None:
        self.params = {k: v.clone().requires_grad_(True) for k, v in committed.items()}
        self.positions, self.queries, self.labels = positions, queries, labels
        self._adam = adam_update(list(self.params.values()), lr)

    def layer_state(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.params, self.positions

    def loss(self, lm: torch.Tensor, state: Any) -> torch.Tensor:
        p = gate_probability(self.queries, self.params["gate_weight"], self.params["gate_bias"])
        return lm + nn.functional.binary_cross_entropy(p, self.labels)

    def update(self, loss: torch.Tensor) -> None:
        self._adam(loss)


class DeferEditor(EditorBase):
    """Lifelong editing with DEFER at the FFN value projection."""

    method = "DEFER"
    config_class = DeferConfig
    layer_class = DeferLayer
    route_unit = "counterfactual model"
    layer: DeferLayer

    def _make_layer(self, module: nn.Module) -> DeferLayer:
        return DeferLayer(module, self.config.threshold)

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> _DeferDraft:
        position = rows.input_ids.shape[1] - rows.targets.shape[1] - 1  # last prompt token
        queries, labels = self._gate_examples(lower.acts[0, position])
        positions = torch.tensor([position], device=self.device)
        return _DeferDraft(self.layer.params(), positions, queries, labels, self.config.lr)

    def _commit(self, draft: Draft, result: EditResult) -> None:
        assert isinstance(draft, _DeferDraft)
        with torch.no_grad():
            for name, value in draft.params.items():
                getattr(self.layer, name).copy_(value.detach())
        self.layer.trained = True

    def _gate_examples(self, edit_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's batch for this edit: the edit prompt (1) and unrelated
        prompts from the pool (0), each as its last-token query."""
        queries, labels = [edit_query.view(1, -1).float()], [1.0]
        count = self.config.irrelevant_rows
        if count:
            negatives = last_token(*self._prompt_batch_acts(self._irrelevant_sample(count)))
            queries.append(negatives.float())
            labels += [0.0] * negatives.shape[0]
        return torch.cat(queries), torch.tensor(labels, device=self.device)

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {"trained": self.layer.trained}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return self.layer.params()

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: DeferConfig, weight: torch.Tensor
    ) -> None:
        check.field(state, "trained", bool)
        out_dim, in_dim = weight.shape
        shapes = {
            "gate_weight": (in_dim,),
            "gate_bias": (),
            "head_weight": (out_dim, in_dim),
            "head_bias": (out_dim,),
        }
        for name in PARAMS:
            check.tensor(name, shapes[name])

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        for name in PARAMS:
            getattr(self.layer, name).copy_(tensors[name])
        self.layer.trained = state["trained"]
