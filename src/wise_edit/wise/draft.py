"""What one WISE edit trains: a step of the planned side memory, inside its shard's mask
(or, in a compact memory, the edit's own rank-r product, `compact.py`), on the target
NLL plus the router's margin loss (Eq. 5) and, with replay, L_memo."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.draft import Draft
from ..core.fastpath import Captured
from ..core.rows import EditRows
from .bank import Plan
from .compact import bounded_scale
from .config import WiseConfig
from .router import Acts, Change, Factors, margin_loss, replay_loss, sequence_scores
from .shards import AdamMoments, adam_direction, clamp_to_bound, masked_step


class WiseDraft(Draft):
    """Adam or SGD on a step of the active side memory, under the shard's mask, or on the
    two factors of the edit's product (``start``: where they begin)."""

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
        start: Factors | None = None,
    ) -> None:
        self.config, self.plan, self.scale = config, plan, scale
        self.subject_key = subject_key  # (O,), zeros: not gated
        self._rehearsal = rehearsal
        self.memory, self.shard = plan.memory, plan.shard
        self.edit_acts, self.unrelated, self.replay = edit, unrelated, replay
        self.factors = start  # compact memory: the edit's own product, trained
        if isinstance(plan.base, Factors):
            assert start is not None, "a compact memory's edit starts from its factors"
            self.params = [p.clone().requires_grad_(True) for p in start]
        else:
            self.mask = plan.masks[plan.shard].to(plan.base.device, torch.float32)
            self.params = [torch.zeros_like(plan.base, requires_grad=True)]
        self.moments: list[AdamMoments | None] = [None] * len(self.params)  # adam

    @property
    def step(self) -> Change:
        """What this edit adds to its memory: a dense step, or its `Factors`."""
        if isinstance(self.plan.base, Factors):
            return Factors(*self.params)
        return self.params[0]

    @torch.no_grad()
    def trained(self) -> Change:
        """The step to fold into the memory once training is done. A product is held to
        the norm bound here, once, by shortening it (`compact.bounded_scale`): shortening
        it during training, whenever one entry touched the bound, stalled the whole edit."""
        step = self.step
        if not isinstance(step, Factors):
            return step.detach()
        up, down = step.up.detach(), step.down.detach()
        bound = self.config.memory.norm_bound
        if bound is not None:
            up = up * bounded_scale(self.plan.base.dense(), up @ down, bound)  # type: ignore[union-attr]
        return Factors(up, down)

    def layer_state(self) -> Change:
        base, step = self.plan.base, self.step
        if isinstance(base, Factors):
            return Factors(torch.cat([base.up, step.up], 1), torch.cat([base.down, step.down]))
        return base + step

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
        self.apply(torch.autograd.grad(loss, self.params))

    def apply(self, grads: Sequence[torch.Tensor]) -> None:
        """One optimisation step from the loss's gradients for `params`."""
        cfg = self.config
        with torch.no_grad():
            directions = list(grads)
            if cfg.optimizer == "adam":
                for i, grad in enumerate(grads):
                    directions[i], self.moments[i] = adam_direction(self.moments[i], grad)
            if isinstance(self.plan.base, Factors):
                for param, direction in zip(self.params, directions):
                    param.sub_(cfg.lr * direction)
                return
            (step,) = self.params
            new = masked_step(step, directions[0], self.mask, cfg.lr)
            step.copy_(clamp_to_bound(new, self.plan.base, cfg.memory.norm_bound))
