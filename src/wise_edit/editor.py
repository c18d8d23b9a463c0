"""`WiseEditor`: attaches WISE to a causal LM and runs the lifelong editing loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import WiseConfig
from .editing import EditorBase, EditResult, Fitted, editing_mode, fit
from .fastpath import Captured
from .layer import SideMemory, WiseLayer
from .masks import clamp_to_bound, mask_generator, masked_step, random_masks
from .merging import get_merge
from .neutral import NEUTRAL_PROMPTS
from .router import margin_loss, replay_loss, sequence_scores, threshold
from .router import route as route_rows
from .rows import SEED_WORDS, EditRows, left_pad, pad_id

__all__ = ["EditResult", "WiseEditor"]

logger = logging.getLogger(__name__)


@dataclass
class _Plan:
    """Where the next edit goes; nothing is changed until the edit succeeds."""

    memory: int
    new_memory: bool
    shard: int
    masks: list[torch.Tensor]  # the merge group's masks (new ones if the group starts now)
    base_delta: torch.Tensor


class WiseEditor(EditorBase):
    """Lifelong editing of one causal LM with WISE.

    The model is modified in place: its value projection is replaced by a `WiseLayer`
    until `detach()`. Editing state lives on this object and saves with `save()`.
    """

    method = "WISE"
    config_class = WiseConfig
    layer_class = WiseLayer
    save_files = ("wise_config.json", "wise_state.json", "wise_memories.safetensors")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: WiseConfig | None = None,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, config, irrelevant_prompts)
        self.score_scale: float | None = self.config.score_scale
        self.prefixes: list[str] | None = None
        self._prompt_acts: dict[int, torch.Tensor] = {}  # edit id -> (t, I), derived, CPU

    # ------------------------------------------------------------------ serving
    @property
    def memories(self) -> list[SideMemory]:
        return list(self.layer.memories)

    @torch.no_grad()
    def activation_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """Activation score of each prompt against each side memory: (memories, prompts)."""
        acts, mask = self._prompt_batch_acts(list(prompts))
        if not len(self.layer.memories):
            return torch.zeros((0, len(prompts)))
        return self.layer.scores(acts, mask).cpu()

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> list[int]:
        """Which memory each prompt would use (-1: the main memory, i.e. unedited)."""
        scores = self.activation_scores(prompts)
        if scores.numel() == 0:
            return [-1] * len(prompts)
        return route_rows(scores, self.layer.thresholds(scores.device)).tolist()

    @property
    def thresholds(self) -> list[float]:
        return [m.epsilon for m in self.layer.memories]

    # ------------------------------------------------------------------ editing
    def edit(self, prompt: str, target: str) -> EditResult:
        """Apply one edit. On any error the editor is left exactly as before the call."""
        started = time.perf_counter()
        with editing_mode(self.model):
            rows = self._edit_rows(prompt, target, self._ensure_prefixes())
            plan = self._plan()
            lower = self._capture(rows, keep_lower_output=self.config.fast_path)
            step, fitted = self._train(rows, lower, plan)
        prompt_acts = lower.acts[0][rows.prompt_mask[0].bool()].cpu()
        result = self._result(prompt, target, fitted, started, memory=plan.memory, shard=plan.shard)
        self._commit(plan, step, prompt_acts, result)
        return result

    def _plan(self) -> _Plan:
        cfg = self.config
        memories = self.layer.memories
        memory = memories[-1] if len(memories) else None
        if memory is None or memory.closed:
            index = len(memories)
            masks = self._group_masks(index, 0)
            return _Plan(
                index, True, 0, masks, torch.zeros_like(self.layer.weight, dtype=torch.float32)
            )
        index = len(memories) - 1
        done = len(memory.edit_ids) - memory.merges * cfg.edits_per_memory()
        masks = memory.masks or self._group_masks(index, memory.merges)
        return _Plan(index, False, done // cfg.shard_size, masks, memory.delta)

    def _group_masks(self, memory: int, group: int) -> list[torch.Tensor]:
        gen = mask_generator(self.config.seed, memory, group)
        return random_masks(
            self.layer.weight.shape, self.config.mask_ratio, self.config.shards_per_merge, gen
        )

    def _train(self, rows: EditRows, lower: Captured, plan: _Plan) -> tuple[torch.Tensor, Fitted]:
        """SGD on the active side memory only, under the shard's mask."""
        cfg, scale = self.config, self._ensure_scale()
        irr_acts, irr_mask = self._irrelevant_acts()
        replay = self._replay_acts(plan.memory)
        mask = plan.masks[plan.shard].to(self.device, torch.float32)
        step = torch.zeros_like(plan.base_delta, requires_grad=True)

        def loss_fn() -> tuple[torch.Tensor, torch.Tensor]:
            delta = plan.base_delta + step
            with self.layer.trial(delta):
                lm = self._lm_loss(rows, lower, cfg.fast_path)
            # scores in units of the model's scale, so the paper's margins mean the same
            # thing on every model; margin_weight sets the routing loss against the LM loss
            loss = lm + cfg.margin_weight * margin_loss(
                sequence_scores(lower.acts, delta, rows.prompt_mask) / scale,
                sequence_scores(irr_acts, delta, irr_mask) / scale,
                cfg.alpha,
                cfg.beta,
                cfg.gamma,
            )
            if replay is not None:
                past = sequence_scores(replay[0], delta, replay[1]) / scale
                loss = loss + cfg.margin_weight * replay_loss(past, cfg.alpha)
            return loss, lm

        def update(loss: torch.Tensor) -> None:
            (grad,) = torch.autograd.grad(loss, step)
            with torch.no_grad():
                new = masked_step(step, grad, mask, cfg.lr)
                step.copy_(clamp_to_bound(new, plan.base_delta, cfg.norm_bound))

        fitted = fit(
            loss_fn,
            update,
            max_steps=cfg.max_steps,
            early_stop_loss=cfg.early_stop_loss,
            patience=cfg.early_stop_patience,
        )
        return step.detach(), fitted

    def _irrelevant_acts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._prompt_batch_acts(
            self._irrelevant_sample(self.config.irrelevant_rows, self.config.seed)
        )

    def _replay_acts(self, memory: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Prompt activations of edits held by earlier memories (retrieve mode, replay on)."""
        if not self.config.replay:  # validated: only in retrieve mode
            return None
        ids = [i for m in list(self.layer.memories)[:memory] for i in m.edit_ids]
        if not ids:
            return None
        gen = torch.Generator().manual_seed(self.config.seed * 104729 + len(self.edit_log))
        picks = torch.randperm(len(ids), generator=gen)[: self.config.replay_rows].tolist()
        acts, mask = _stack_ragged(self._edit_prompt_acts([ids[i] for i in picks]), self.device)
        return acts, mask

    def _edit_prompt_acts(self, edit_ids: list[int]) -> list[torch.Tensor]:
        """Cached prompt activations of past edits; recomputed after `load`."""
        missing = sorted({i for i in edit_ids if i not in self._prompt_acts})
        if missing:
            acts, mask = self._prompt_batch_acts([self.edit_log[i]["prompt"] for i in missing])
            for row, i in enumerate(missing):
                self._prompt_acts[i] = acts[row][mask[row].bool()].cpu()
        return [self._prompt_acts[i] for i in edit_ids]

    # ------------------------------------------------------------------ commit / merge
    def _commit(
        self, plan: _Plan, step: torch.Tensor, prompt_acts: torch.Tensor, result: EditResult
    ) -> None:
        cfg = self.config
        memory = self.layer.new_memory() if plan.new_memory else self.layer.memories[plan.memory]
        if not memory.masks:
            memory.masks = [m.cpu() for m in plan.masks]
        while len(memory.shard_values) <= plan.shard:
            count = int(memory.masks[len(memory.shard_values)].sum())
            memory.shard_values.append(torch.zeros(count, device=self.device))
        memory.delta += step
        memory.shard_values[plan.shard] += step[memory.masks[plan.shard].to(self.device)]
        memory.edit_ids.append(result.index)
        self._log(result)
        self._prompt_acts[result.index] = prompt_acts
        if len(memory.edit_ids) - memory.merges * cfg.edits_per_memory() == cfg.edits_per_memory():
            self._merge(plan.memory, memory)
        self._refresh_threshold(memory)
        logger.info(
            "edit %d -> memory %d shard %d: %d steps, loss %.4f",
            result.index,
            plan.memory,
            plan.shard,
            result.steps,
            result.loss,
        )

    def _merge(self, index: int, memory: SideMemory) -> None:
        """Eq. 8: W_v' <- W_v + Merge(shard task vectors), on top of earlier merges."""
        cfg = self.config
        vectors = [memory.shard_vector(i) for i in range(len(memory.shard_values))]
        earlier = memory.delta - torch.stack(vectors).sum(0)
        weights = [1.0 / len(vectors)] * len(vectors)
        gen = mask_generator(cfg.seed + 1, index, memory.merges)  # DARE's drops, reproducible
        merged = get_merge(cfg.merge_method)(
            vectors, weights, density=cfg.merge_density, generator=gen
        )
        total = earlier + merged.to(earlier.device)
        if cfg.norm_bound is not None:
            total = total.clamp(-cfg.norm_bound, cfg.norm_bound)
        memory.delta.copy_(total)
        memory.masks, memory.shard_values = [], []
        memory.merges += 1
        memory.closed = cfg.mode == "retrieve"
        logger.info("merged %d shards of memory %d with %s", len(vectors), index, cfg.merge_method)

    def _refresh_threshold(self, memory: SideMemory) -> None:
        """epsilon over all edits the memory holds now: later edits and merges move the
        scores of earlier ones, so a threshold frozen at edit time would drop them."""
        acts = self._edit_prompt_acts(memory.edit_ids)
        stacked, mask = _stack_ragged(acts, self.device)
        scores = sequence_scores(stacked, memory.delta, mask)
        memory.epsilon = threshold(scores, self.config.threshold_ratio)

    # ------------------------------------------------------------------ one-time setup
    def _ensure_scale(self) -> float:
        """The routing score unit for this model: median norm of the value projection's
        output on neutral text (the paper's alpha/beta/gamma assume a 7B model's scale)."""
        if self.score_scale is None:
            acts, mask = self._prompt_batch_acts(list(NEUTRAL_PROMPTS))
            with torch.no_grad():
                out = self.layer.base_layer(acts).float()  # (B, T, O)
            per_token = torch.linalg.vector_norm(out, dim=-1)
            per_seq = (per_token * mask).sum(-1) / mask.sum(-1)
            self.score_scale = float(per_seq.median())
        return self.score_scale

    def _ensure_prefixes(self) -> list[str]:
        """The augmentation prefixes, sampled once from the unedited model with a fixed seed."""
        if self.prefixes is None:
            self.prefixes = self._generate_prefixes()
        return self.prefixes

    @torch.no_grad()
    def _generate_prefixes(self) -> list[str]:
        cfg = self.config
        lengths = cfg.prefix_lengths
        devices = [self.device] if self.device.type == "cuda" else []
        prefixes = []
        with torch.random.fork_rng(devices=devices), self.layer.disabled():
            torch.manual_seed(cfg.seed)
            for i in range(cfg.prefix_count):
                word, length = SEED_WORDS[i % len(SEED_WORDS)], lengths[i % len(lengths)]
                ids = self.tokenizer(word, return_tensors="pt").to(self.device)
                out = self.model.generate(
                    **ids,
                    do_sample=True,
                    top_k=5,
                    max_new_tokens=length,
                    min_new_tokens=length,
                    pad_token_id=pad_id(self.tokenizer),
                )
                text = self.tokenizer.decode(out[0], skip_special_tokens=True)
                prefixes.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
        return prefixes

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {
            "score_scale": self.score_scale,
            "prefixes": self.prefixes,
            "memories": [
                {
                    "epsilon": m.epsilon,
                    "edit_ids": m.edit_ids,
                    "merges": m.merges,
                    "closed": m.closed,
                    "masks": len(m.masks),
                    "shards": len(m.shard_values),
                }
                for m in self.layer.memories
            ],
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for i, memory in enumerate(self.layer.memories):
            tensors[f"memory.{i}.delta"] = memory.delta
            for j, mask in enumerate(memory.masks):
                tensors[f"memory.{i}.mask.{j}"] = mask
            for j, values in enumerate(memory.shard_values):
                tensors[f"memory.{i}.shard.{j}"] = values
        return tensors

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.score_scale = state["score_scale"]
        self.prefixes = state["prefixes"]
        for i, meta in enumerate(state["memories"]):
            memory = self.layer.new_memory()
            memory.delta.copy_(tensors[f"memory.{i}.delta"])
            memory.masks = [tensors[f"memory.{i}.mask.{j}"] for j in range(meta["masks"])]
            memory.shard_values = [
                tensors[f"memory.{i}.shard.{j}"].to(memory.delta.device)
                for j in range(meta["shards"])
            ]
            memory.epsilon = float(meta["epsilon"])
            memory.edit_ids = list(meta["edit_ids"])
            memory.merges = int(meta["merges"])
            memory.closed = bool(meta["closed"])

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "memories": len(self.layer.memories),
            "thresholds": self.thresholds,
        }


# ---------------------------------------------------------------------- helpers
def _stack_ragged(
    acts: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of (t_i, I) activations into (N, T, I) with a token mask (N, T)."""
    width = max(a.shape[0] for a in acts)
    out = torch.zeros((len(acts), width, acts[0].shape[1]), dtype=acts[0].dtype)
    lengths = [a.shape[0] for a in acts]
    _, mask = left_pad([[1] * n for n in lengths], 0)
    for row, a in enumerate(acts):
        out[row, width - a.shape[0] :] = a
    return out.to(device), mask.to(device)
