"""`WiseEditor`: attaches WISE to a causal LM and runs the lifelong editing loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import WiseConfig
from .families import check_value_module, decoder_layers, get_submodule
from .fastpath import Captured, capture, fast_lm_loss, full_lm_loss
from .layer import SideMemory, WiseLayer
from .masks import clamp_to_bound, mask_generator, masked_step, random_masks
from .merging import get_merge
from .neutral import NEUTRAL_PROMPTS
from .router import margin_loss, replay_loss, sequence_scores, threshold
from .router import route as route_rows
from .rows import (
    SEED_WORDS,
    EditRows,
    build_rows,
    context_limit,
    encode_prompts,
    left_pad,
    pad_id,
)

logger = logging.getLogger(__name__)


@dataclass
class EditResult:
    """What one edit did: where it went and how its optimisation ended."""

    index: int
    prompt: str
    target: str
    memory: int
    shard: int
    steps: int
    loss: float
    lm_loss: float
    seconds: float


@dataclass
class _Plan:
    """Where the next edit goes; nothing is changed until the edit succeeds."""

    memory: int
    new_memory: bool
    shard: int
    masks: list[torch.Tensor]  # the merge group's masks (new ones if the group starts now)
    base_delta: torch.Tensor


class WiseEditor:
    """Lifelong editing of one causal LM with WISE.

    The model is modified in place: its value projection is replaced by a `WiseLayer`
    until `detach()`. Editing state lives on this object and saves with `save()`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: WiseConfig | None = None,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config if config is not None else WiseConfig.for_model(model)
        self.target_path = self.config.resolve_target(model)
        self.layers, self.layer_index = self._locate_layer(model)
        module = get_submodule(model, self.target_path)
        if isinstance(module, WiseLayer):
            raise ValueError(f"{self.target_path} already has a WISE editor attached")
        check_value_module(module, self.target_path)
        self.irrelevant_prompts = list(irrelevant_prompts or NEUTRAL_PROMPTS)
        if not self.irrelevant_prompts or not all(p.strip() for p in self.irrelevant_prompts):
            raise ValueError("irrelevant_prompts must be non-empty strings")
        self.fingerprint = weight_fingerprint(module, self.target_path, model)
        self.score_scale: float | None = self.config.score_scale
        self.prefixes: list[str] | None = None
        self.edit_log: list[dict[str, Any]] = []
        self._prompt_acts: dict[int, torch.Tensor] = {}  # edit id -> (t, I), derived, CPU
        self.layer = WiseLayer(module)
        _set_submodule(model, self.target_path, self.layer)
        self._hook = model.base_model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._attached = True

    # ------------------------------------------------------------------ attach / detach
    def _locate_layer(self, model: nn.Module) -> tuple[nn.ModuleList, int]:
        """The decoder stack and the index of the edited layer (for the fast path)."""
        layers_path = self.config.resolve_layers_path(model)
        prefix = layers_path + "."
        rest = self.target_path[len(prefix) :] if self.target_path.startswith(prefix) else ""
        head = rest.split(".", 1)[0]
        if not head.isdigit():
            raise ValueError(
                f"target_module: {self.target_path!r} is not inside the decoder layers "
                f"{layers_path!r}"
            )
        return decoder_layers(model, layers_path), int(head)

    def detach(self) -> nn.Module:
        """Put the original module back; the model is exactly the unedited one again."""
        if self._attached:
            self._hook.remove()
            _set_submodule(self.model, self.target_path, self.layer.base_layer)
            self._attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this editor was detached; attach a new WiseEditor to edit again")

    def _on_forward(self, _module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        """Every forward of the backbone: a new sequence is routed once, a forward that
        continues a KV cache keeps the decision made at prefill."""
        past = kwargs.get("past_key_values")
        if past is not None and _cache_length(past) > 0:
            self.layer.routing.hold()
            return
        mask = kwargs.get("attention_mask")
        self.layer.routing.begin(
            mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        )

    # ------------------------------------------------------------------ serving
    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def num_edits(self) -> int:
        return len(self.edit_log)

    @property
    def memories(self) -> list[SideMemory]:
        return list(self.layer.memories)

    def __call__(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def generate(self, **inputs: Any) -> torch.Tensor:
        """`model.generate` with the routing decision held from the prompt for every new token."""
        inputs.setdefault("pad_token_id", pad_id(self.tokenizer))
        return self.model.generate(**inputs)

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
        self._check_attached()
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise TypeError("prompt and target must be strings")
        started = time.perf_counter()
        with _editing_mode(self.model):
            rows = build_rows(self.tokenizer, prompt, target, self._ensure_prefixes())
            self._check_length(rows)
            rows = rows.to(self.device)
            plan = self._plan()
            lower = capture(
                self.model.base_model,
                self.layers,
                self.layer_index,
                self.layer,
                rows.input_ids,
                rows.attention_mask,
                keep_lower_output=self.config.fast_path,
            )
            step, steps, loss, lm = self._train(rows, lower, plan)
        prompt_acts = lower.acts[0][rows.prompt_mask[0].bool()].cpu()
        result = EditResult(
            len(self.edit_log),
            prompt,
            target,
            plan.memory,
            plan.shard,
            steps,
            loss,
            lm,
            time.perf_counter() - started,
        )
        self._commit(plan, step, prompt_acts, result)
        return result

    def edit_many(
        self, records: Iterable[Mapping[str, str] | tuple[str, str]], progress: bool = False
    ) -> list[EditResult]:
        """Edit a stream, one sequential edit at a time, continuing the same state."""
        records = list(records)
        results: list[EditResult] = []
        bar = tqdm(records, desc="editing", unit="edit", disable=not progress)
        for record in bar:
            prompt, target = _prompt_target(record)
            results.append(self.edit(prompt, target))
            bar.set_postfix(s_per_edit=f"{results[-1].seconds:.2f}", steps=results[-1].steps)
        return results

    def _check_length(self, rows: EditRows) -> None:
        limit = context_limit(self.model.config)
        if limit is not None and rows.input_ids.shape[1] > limit:
            raise ValueError(
                f"edit is {rows.input_ids.shape[1]} tokens with its prefix, longer than the "
                f"model's context of {limit} tokens"
            )

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

    def _train(
        self, rows: EditRows, lower: Captured, plan: _Plan
    ) -> tuple[torch.Tensor, int, float, float]:
        """SGD on the active side memory only, under the shard's mask."""
        cfg, scale = self.config, self._ensure_scale()
        irr_acts, irr_mask = self._irrelevant_acts()
        replay = self._replay_acts(plan.memory)
        mask = plan.masks[plan.shard].to(self.device, torch.float32)
        step = torch.zeros_like(plan.base_delta, requires_grad=True)
        below, loss_value, lm_value, n = 0, float("nan"), float("nan"), 0
        for n in range(1, cfg.max_steps + 1):
            delta = plan.base_delta + step
            with self.layer.override(delta):
                lm = self._lm_loss(rows, lower)
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
            loss_value, lm_value = loss.item(), lm.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"edit loss became {loss_value} at step {n}; the edit was not applied "
                    "(try a smaller lr)"
                )
            below = below + 1 if loss_value < cfg.early_stop_loss else 0
            if below >= cfg.early_stop_patience:
                break
            (grad,) = torch.autograd.grad(loss, step)
            with torch.no_grad():
                new = masked_step(step, grad, mask, cfg.lr)
                step.copy_(clamp_to_bound(new, plan.base_delta, cfg.norm_bound))
        return step.detach(), n, loss_value, lm_value

    def _lm_loss(self, rows: EditRows, lower: Captured) -> torch.Tensor:
        if self.config.fast_path:
            return fast_lm_loss(
                self.model,
                self.layers,
                self.layer_index,
                lower,
                rows.input_ids,
                rows.attention_mask,
                rows.targets,
            )
        return full_lm_loss(self.model, rows.input_ids, rows.attention_mask, rows.targets)

    def _irrelevant_acts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unrelated prompts for this edit's margin loss, drawn from the pool by a generator
        seeded from the edit index (reproducible, and the same after save/load)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + len(self.edit_log))
        count = min(cfg.irrelevant_rows, len(self.irrelevant_prompts))
        picks = torch.randperm(len(self.irrelevant_prompts), generator=gen)[:count].tolist()
        return self._prompt_batch_acts([self.irrelevant_prompts[i] for i in picks])

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

    @torch.no_grad()
    def _prompt_batch_acts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Value-matrix inputs (B, T, I) and token mask (B, T) of a left-padded prompt batch."""
        ids, mask = encode_prompts(self.tokenizer, prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with _editing_mode(self.model):
            acts = capture(
                self.model.base_model,
                self.layers,
                self.layer_index,
                self.layer,
                ids,
                mask,
                keep_lower_output=False,
            ).acts
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
        self.edit_log.append(asdict(result))
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
    def save(self, path: str) -> None:
        """Write config, state and side memories (safetensors + JSON, no pickle)."""
        from .persistence import save_editor

        save_editor(self, path)

    @classmethod
    def load(
        cls,
        model: nn.Module,
        tokenizer: Any,
        path: str,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> WiseEditor:
        """Re-attach saved edits to ``model``; refuses a directory made for another model."""
        from .persistence import load_editor

        return load_editor(cls, model, tokenizer, path, irrelevant_prompts)


# ---------------------------------------------------------------------- helpers
def weight_fingerprint(module: nn.Module, path: str, model: nn.Module) -> dict[str, Any]:
    """Identifies the main weight the edits were made against."""
    import hashlib

    weight = module.weight.detach().float().cpu().contiguous()
    return {
        "model_type": getattr(model.config, "model_type", None),
        "target_module": path,
        "shape": list(weight.shape),
        "sha256": hashlib.sha256(weight.numpy().tobytes()).hexdigest(),
    }


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _cache_length(past: Any) -> int:
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


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


def _prompt_target(record: Mapping[str, str] | tuple[str, str]) -> tuple[str, str]:
    if isinstance(record, Mapping):
        if "prompt" not in record or "target" not in record:
            raise ValueError(
                f"an edit record needs 'prompt' and 'target' keys, got {sorted(record)}"
            )
        return record["prompt"], record["target"]
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return record[0], record[1]
    raise ValueError(f"an edit record is a mapping or a (prompt, target) pair, got {record!r}")


@contextmanager
def _editing_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and frozen model parameters while an edit trains, restored
    afterwards: gradients flow only into the side memory's step."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
