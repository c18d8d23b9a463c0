"""What one WISE edit trains: a step of the planned side memory, inside its shard's mask,
on the target NLL plus the router's margin loss (Eq. 5) and, with replay, L_memo."""

from __future__ import annotations

import torch

from ..core.draft import Draft
from ..core.fastpath import Captured
from ..core.rows import EditRows
from .bank import Plan
from .config import WiseConfig
from .router import Acts, margin_loss, replay_loss, sequence_scores
from .shards import AdamMoments, adam_direction, clamp_to_bound, masked_step


class WiseDraft(Draft):
    """Adam or SGD on a step of the active side memory, under the shard's mask."""

    def __init__(
        self,
        config: WiseConfig,
        plan: Plan,
        edit: Acts,
        unrelated: Acts,
        replay: Acts | None,
        scale: float,
        rehearsal: list[tuple[EditRows, Captured]],
        subject_key: torch.Tensor,
    ) -> None:
        self.config, self.plan, self.scale = config, plan, scale
        self.subject_key = subject_key  # (O,), zeros: not gated
        self._rehearsal = rehearsal
        self.memory, self.shard = plan.memory, plan.shard
        self.edit_acts, self.unrelated, self.replay = edit, unrelated, replay
        self.mask = plan.masks[plan.shard].to(plan.base_delta.device, torch.float32)
        self.step = torch.zeros_like(plan.base_delta, requires_grad=True)
        self.moments: AdamMoments | None = None  # adam

    def layer_state(self) -> torch.Tensor:
        return self.plan.base_delta + self.step

    def side_loss(self, delta: torch.Tensor) -> torch.Tensor:
        """The margin loss (Eq. 5) and, with replay, the replay loss: functions of the side
        memory and the captured layer inputs alone."""
        routing, weight = self.config.routing, self.config.routing.margin_weight

        def scores(acts: Acts) -> torch.Tensor:
            # in units of the model's scale, so the paper's margins mean the same thing on
            # every model; margin_weight sets the routing loss against the LM loss
            return sequence_scores(acts[0], delta, acts[1]) / self.scale

        loss = weight * margin_loss(
            scores(self.edit_acts),
            scores(self.unrelated),
            routing.alpha,
            routing.beta,
            routing.gamma,
        )
        if self.replay is not None:
            loss = loss + weight * replay_loss(scores(self.replay), routing.alpha)
        return loss

    def rehearsal(self) -> list[tuple[EditRows, Captured]]:
        return self._rehearsal

    def update(self, loss: torch.Tensor) -> None:
        cfg = self.config
        (grad,) = torch.autograd.grad(loss, self.step)
        with torch.no_grad():
            if cfg.optimizer == "adam":
                grad, self.moments = adam_direction(self.moments, grad)
            new = masked_step(self.step, grad, self.mask, cfg.lr)
            self.step.copy_(clamp_to_bound(new, self.plan.base_delta, cfg.memory.norm_bound))
