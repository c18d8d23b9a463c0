"""`WiseEditor`: attaches WISE to a causal LM and plans where each edit of the stream
goes. The edit template (rows, capture, fit, commit) is `EditorBase.edit`; the side
memory does its own bookkeeping (`SideMemory`); this file decides memory, shard and
masks, builds the training loss from the router's margin loss, and keeps the one-time
calibration (score unit, augmentation prefixes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.attach import editing_mode
from ..core.draft import Draft, EditRequest, EditResult
from ..core.editor import EditorBase
from ..core.fastpath import Captured, layer_output
from ..core.persistence import STATE_FILE
from ..core.rows import SEED_WORDS, EditRows, build_answer_rows, encode_prompts, left_pad, pad_id
from ..core.seeds import (
    candidate_generator,
    mask_generator,
    merge_generator,
    rehearsal_generator,
    replay_generator,
    subject_generator,
)
from ..core.validate import SaveChecker
from ..neutral import NEUTRAL_PROMPTS, NEUTRAL_SUBJECTS, swap_subject
from .config import WiseConfig
from .layer import SideMemory, WiseLayer
from .masks import (
    AdamMoments,
    adam_direction,
    clamp_to_bound,
    heavy_ball,
    masked_step,
    random_masks,
)
from .merging import get_merge
from .router import (
    background_radius,
    margin_loss,
    mean_inputs,
    nearest,
    replay_loss,
    score_unit,
    sequence_scores,
)
from .subject import centred_unit, subject_end

__all__ = ["EditResult", "WiseEditor"]

Acts = tuple[torch.Tensor, torch.Tensor]  # (N, T, I) value-matrix inputs, (N, T) token mask
# the calibrated key radius: this quantile of the cosines between the keys of pairs of
# neutral sentences (1% of such pairs lie nearer than it)
RADIUS_QUANTILE = 0.99
# the subject gate's key: the residual stream after this many decoder layers, unless the
# config names it (on SmolLM2, 2 of 30 kept subjects apart and 3 and above did not)
DEFAULT_SUBJECT_LAYER = 2


@dataclass
class _Plan:
    """Where the next edit goes; nothing is changed until the edit succeeds."""

    memory: int
    new_memory: bool
    shard: int
    masks: list[torch.Tensor]  # the merge group's masks (new ones if the group starts now)
    base_delta: torch.Tensor
    held: tuple[int, ...] = ()  # edits the memory already holds


class _WiseDraft(Draft):
    """Adam or SGD on a step of the active side memory, under the shard's mask: the
    target NLL plus the margin loss (Eq. 5) and, in retrieve mode, the replay loss
    (L_memo)."""

    def __init__(
        self,
        config: WiseConfig,
        plan: _Plan,
        edit: Acts,
        unrelated: Acts,
        replay: Acts | None,
        scale: float,
        rehearsal: list[tuple[EditRows, Captured]],
        subject_key: torch.Tensor,
    ) -> None:
        self.config, self.plan, self.scale = config, plan, scale
        self.subject_key = subject_key  # (H,), zeros: not gated (`subject.py`)
        self._rehearsal = rehearsal
        self.memory, self.shard = plan.memory, plan.shard
        self.edit_acts, self.unrelated, self.replay = edit, unrelated, replay
        self.mask = plan.masks[plan.shard].to(plan.base_delta.device, torch.float32)
        self.step = torch.zeros_like(plan.base_delta, requires_grad=True)
        self.velocity: torch.Tensor | None = None  # sgd with momentum
        self.moments: AdamMoments | None = None  # adam

    def layer_state(self) -> torch.Tensor:
        return self.plan.base_delta + self.step

    def side_loss(self, delta: torch.Tensor) -> torch.Tensor:
        """The margin loss (Eq. 5) and, in retrieve mode, the replay loss: functions of
        the side memory and the captured layer inputs alone."""
        cfg = self.config

        def scores(acts: Acts) -> torch.Tensor:
            # in units of the model's scale, so the paper's margins mean the same thing on
            # every model; margin_weight sets the routing loss against the LM loss
            return sequence_scores(acts[0], delta, acts[1]) / self.scale

        loss = cfg.margin_weight * margin_loss(
            scores(self.edit_acts), scores(self.unrelated), cfg.alpha, cfg.beta, cfg.gamma
        )
        if self.replay is not None:
            loss = loss + cfg.margin_weight * replay_loss(scores(self.replay), cfg.alpha)
        return loss

    def rehearsal(self) -> list[tuple[EditRows, Captured]]:
        return self._rehearsal

    def update(self, loss: torch.Tensor) -> None:
        cfg = self.config
        (grad,) = torch.autograd.grad(loss, self.step)
        with torch.no_grad():
            if cfg.optimizer == "adam":
                grad, self.moments = adam_direction(self.moments, grad)
            elif cfg.momentum:
                grad = heavy_ball(self.velocity, grad, cfg.momentum)
                self.velocity = grad
            new = masked_step(self.step, grad, self.mask, cfg.lr)
            self.step.copy_(clamp_to_bound(new, self.plan.base_delta, cfg.norm_bound))


class WiseEditor(EditorBase):
    """Lifelong editing of one causal LM with WISE.

    The model is modified in place: its value projection is replaced by a `WiseLayer`
    until `detach()`. Editing state lives on this object and saves with
    `save_pretrained()`.
    """

    method = "WISE"
    config_class = WiseConfig
    layer_class = WiseLayer
    route_unit = "side memory"
    retractable = True
    config: WiseConfig
    layer: WiseLayer

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: WiseConfig | None = None,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(model, tokenizer, config, irrelevant_prompts)
        self._subject_hook: Any = None
        depth = self._subject_depth()
        if depth:
            below = self.layers[depth - 1]
            self._subject_hook = below.register_forward_hook(self._hand_up_lower_states)
        else:
            self.layer.subject_tau = 0.0
        self.score_scale: float | None = self.config.score_scale
        self.prefixes: list[str] | None = None
        self._prompt_acts: dict[int, torch.Tensor] = {}  # edit id -> (t, I), derived, CPU
        self._negatives: _NegativePool | None = None  # derived, computed once

    @classmethod
    def variant_of(cls, config: WiseConfig) -> str:
        return config.mode

    # ------------------------------------------------------------------ inspection
    @property
    def memories(self) -> tuple[SideMemory, ...]:
        return tuple(self.layer.memories)

    def memory_holding(self, edit_id: int) -> int | None:
        """The side memory that holds edit ``edit_id`` (None: no memory holds it, e.g. a
        retracted edit), for reading where an edit went and for retraction."""
        return next((i for i, m in enumerate(self.layer.memories) if edit_id in m.edit_ids), None)

    @property
    def key_radius(self) -> float | None:
        """The radius routing uses (`WiseConfig.key_radius`); None until calibrated."""
        return self.layer.radius

    @property
    def thresholds(self) -> list[float]:
        return [m.epsilon for m in self.layer.memories]

    @torch.no_grad()
    def activation_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """Activation score of each prompt against each side memory: (memories, prompts)."""
        if not len(self.layer.memories):
            return torch.zeros((0, len(prompts)))
        acts, mask = self._prompt_batch_acts(list(prompts))
        return self.layer.scores(acts, mask).cpu()

    @torch.no_grad()
    def prompt_keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Each prompt's query to the retrieval index, the mean value-matrix input over the
        tokens routing reads: (prompts, I). Compared by cosine with `edit_keys`, it says
        how close a prompt's wording is to each edit's, apart from any memory's score."""
        acts, mask = self._prompt_batch_acts(list(prompts))
        return mean_inputs(acts, mask).float().cpu()

    def edit_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every edit's key (E, I) and the side memory holding it (E,), in memory order."""
        if not len(self.layer.memories):
            return torch.zeros((0, self.layer.weight.shape[1])), torch.zeros(0, dtype=torch.long)
        keys, owners = self.layer.key_index(torch.device("cpu"))
        return keys.clone(), owners.clone()  # the layer's own index is not the caller's

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "memories": len(self.layer.memories),
            "thresholds": self.thresholds,
            "key_radius": self.key_radius,
        }

    # ------------------------------------------------------------------ one edit
    def _row_prefixes(self) -> list[str]:
        """The augmentation prefixes, sampled once from the unedited model."""
        if self.prefixes is None:
            self.prefixes = self._generate_prefixes()
        return self.prefixes

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> _WiseDraft:
        return self._draft_for(self._plan(), rows, lower, len(self.edit_log), request)

    def _draft_for(
        self, plan: _Plan, rows: EditRows, lower: Captured, index: int, request: EditRequest
    ) -> _WiseDraft:
        """The draft of edit ``index`` under ``plan``; its random draws depend on the
        edit's index only, so retraining it in a rebuild draws the same. Its unrelated
        prompts: random pool prompts, the pool prompts nearest to it (hard negatives) and
        its own prompt about other subjects (subject-swapped negatives)."""
        cfg = self.config
        drawn = self._irrelevant_sample(cfg.irrelevant_rows, index)
        drawn += self._subject_swaps(request, index)
        negatives = [a[m.bool()].cpu() for a, m in zip(*self._prompt_batch_acts(drawn))]
        if cfg.hard_negatives:
            pool = self._negative_pool()
            query = mean_inputs(lower.acts[:1], rows.prompt_mask[:1])[0]
            picks = pool.nearest(query, cfg.hard_negatives, taken=set(drawn))
            negatives += [pool.acts[i] for i in picks]
        return _WiseDraft(
            cfg,
            plan,
            (lower.acts, rows.prompt_mask),
            _stack_ragged(negatives, self.device),
            self._replay_acts(plan.memory, index),
            self._calibrate(),
            self._rehearsal(plan, index),
            self._subject_key(request),
        )

    def _subject_swaps(self, request: EditRequest, index: int) -> list[str]:
        """The edit's prompt rewritten about `subject_negatives` built-in subjects (a
        seeded draw per edit index; none when the edit names no subject)."""
        count = self.config.subject_negatives
        if not count or request.subject is None:
            return []
        subject = request.subject.lower()
        others = [s for s in NEUTRAL_SUBJECTS if s.lower() != subject]
        order = torch.randperm(len(others), generator=subject_generator(self.config.seed, index))
        return swap_subject(request.prompt, request.subject, [others[i] for i in order[:count]])

    def _rehearsal(self, plan: _Plan, index: int) -> list[tuple[EditRows, Captured]]:
        """Rows of the earlier edits of the memory edit ``index`` goes to (a seeded
        sample of at most `rehearse_rows`), with their lower part captured once."""
        k = self.config.rehearse_rows
        if not k or not plan.held:
            return []
        held = list(plan.held)
        if len(held) > k:
            gen = rehearsal_generator(self.config.seed, index)
            picks = torch.randperm(len(held), generator=gen)
            held = [held[i] for i in sorted(picks[:k].tolist())]
        pairs = [(self.edit_log[i]["prompt"], self.edit_log[i]["target"]) for i in held]
        rows = build_answer_rows(self.format, pairs, stop=self.config.train_stop).to(self.device)
        return [(rows, self._capture(rows, keep_lower_output=self.config.fast_path))]

    @torch.no_grad()
    def _negative_pool(self) -> _NegativePool:
        """The prompts hard negatives are chosen among: a seeded sample of
        `hard_negative_candidates` pool prompts whose activations are computed once (they
        are frozen below the edited layer), so an edit's hard negatives cost it nothing."""
        if self._negatives is None:
            pool, n = self.irrelevant_prompts, self.config.hard_negative_candidates
            order = torch.randperm(len(pool), generator=candidate_generator(self.config.seed))
            prompts = [pool[i] for i in order[:n].tolist()]
            acts: list[torch.Tensor] = []
            for i in range(0, len(prompts), 32):  # fixed batches: the same values on reload
                batch, mask = self._prompt_batch_acts(prompts[i : i + 32])
                acts += [a[m.bool()].cpu() for a, m in zip(batch, mask)]
            self._negatives = _NegativePool(prompts, acts)
        return self._negatives

    def _plan(self) -> _Plan:
        memories = self.layer.memories
        memory = memories[-1] if len(memories) else None
        if memory is None or memory.closed:
            return self._plan_in(None, len(memories))
        return self._plan_in(memory, len(memories) - 1)

    def _plan_in(self, memory: SideMemory | None, index: int) -> _Plan:
        """The next edit of memory number ``index`` (None: a memory that starts now)."""
        if memory is None:
            masks = self._group_masks(index, 0)
            zeros = torch.zeros_like(self.layer.weight, dtype=torch.float32)
            return _Plan(index, True, 0, masks, zeros)
        masks = list(memory.masks) or self._group_masks(index, memory.merges)
        shard = memory.group_edits // self.config.shard_size
        return _Plan(index, False, shard, masks, memory.delta, tuple(memory.edit_ids))

    def _group_masks(self, memory: int, group: int) -> list[torch.Tensor]:
        cfg = self.config
        gen = mask_generator(cfg.seed, memory, group)
        return random_masks(self.layer.weight.shape, cfg.mask_ratio, cfg.shards_per_merge, gen)

    def _replay_acts(self, memory: int, index: int) -> Acts | None:
        """Prompt activations of edits held by earlier memories (retrieve mode, replay on),
        for edit ``index``."""
        if not self.config.replay:  # validated: only in retrieve mode
            return None
        ids = [i for m in list(self.layer.memories)[:memory] for i in m.edit_ids]
        if not ids:
            return None
        gen = replay_generator(self.config.seed, index)
        picks = torch.randperm(len(ids), generator=gen)[: self.config.replay_rows].tolist()
        return self._stacked_prompt_acts([ids[i] for i in picks])

    def _commit(self, draft: Draft, result: EditResult) -> None:
        assert isinstance(draft, _WiseDraft)
        plan = draft.plan
        memory = self.layer.new_memory() if plan.new_memory else self.layer.memories[plan.memory]
        self._fold(memory, draft, result.index)

    def _fold(self, memory: SideMemory, draft: _WiseDraft, index: int) -> None:
        """Add trained edit ``index`` to ``memory``: its step, a merge when the group is
        full, the threshold over the memory's edits."""
        cfg, plan = self.config, draft.plan
        memory.add_edit(index, plan.shard, draft.step.detach(), plan.masks)
        acts, mask = draft.edit_acts
        self._prompt_acts[index] = acts[0][mask[0].bool()].cpu()
        memory.add_key(self._prompt_acts[index].float().mean(0))
        memory.add_subject_key(draft.subject_key)
        if memory.group_edits == cfg.edits_per_memory():
            self._merge_group(memory, plan.memory, cfg.merge_method)
        self._refresh_threshold(memory)

    def _refresh_threshold(self, memory: SideMemory) -> None:
        """epsilon over every edit the memory holds, after an edit or a merge moved it."""
        acts = self._stacked_prompt_acts(memory.edit_ids)
        memory.refresh_threshold(*acts, self.config.threshold_ratio)

    def _merge_group(self, memory: SideMemory, number: int, method: str) -> None:
        """Eq. 8 for memory number ``number``, whose group of shards is full. Its own
        method so that a subclass can look at the shards first (benchmarks/merge_compare.py
        keeps them, to merge one trained stream with every method)."""
        cfg = self.config
        memory.merge(
            get_merge(method),
            density=cfg.merge_density,
            generator=merge_generator(cfg.seed, number, memory.merges),
            norm_bound=cfg.norm_bound,
            close=cfg.mode == "retrieve",
        )

    # ------------------------------------------------------------------ retraction
    def _rebuild_without(self, edit_id: int) -> tuple[Callable[[], None], int]:
        """Retrain the side memory that holds ``edit_id`` from scratch on its other edits,
        in their order, each with its own random draws. Retrieve: one small memory (at
        most ``edits_per_memory() - 1`` edits retrained); a memory that was closed stays
        closed, holding its edits unmerged. Merge: the one memory holds every edit, so
        every other edit is retrained - a retraction costs as much as the whole stream -
        and each is drawn with the index it has among the live edits, so the memory equals
        the one a stream without the edit builds."""
        number = self.memory_holding(edit_id)
        assert number is not None, f"live edit {edit_id} is in no side memory"
        old = self.layer.memories[number]
        kept = [i for i in old.edit_ids if i != edit_id]
        draws = kept if self.config.mode == "retrieve" else list(range(len(kept)))
        fresh = SideMemory(self.layer.weight.shape, self.layer.weight.device)
        for index, draw in zip(kept, draws):
            entry = self.edit_log[index]
            rows = self._edit_rows(entry["prompt"], entry["target"])
            lower = self._capture(rows, keep_lower_output=self.config.fast_path)
            plan = self._plan_in(fresh, number)
            draft = self._draft_for(plan, rows, lower, draw, EditRequest.of_entry(entry))
            self._fit(draft, rows, lower)
            self._fold(fresh, draft, index)
        if old.closed:
            fresh.close()

        def install() -> None:
            self.layer.memories[number] = fresh

        return install, len(kept)

    # ------------------------------------------------------------------ edit prompts
    def _stacked_prompt_acts(self, edit_ids: Sequence[int]) -> Acts:
        """Prompt activations of past edits, padded into one batch. Cached per edit (they
        are frozen below the edited layer)."""
        return _stack_ragged([self._prompt_acts_of(i) for i in edit_ids], self.device)

    def _prompt_acts_of(self, index: int) -> torch.Tensor:
        if index not in self._prompt_acts:
            self._prompt_acts[index] = self._recompute_prompt_acts(index)
        return self._prompt_acts[index]

    def _recompute_prompt_acts(self, index: int) -> torch.Tensor:
        """After loading: an edit's prompt activations computed exactly as when it was
        made (row 0 of its own padded row batch), so that a resumed stream gives the
        same thresholds and replay losses, bit for bit, as one never interrupted."""
        entry = self.edit_log[index]
        with editing_mode(self.model):
            rows = self._edit_rows(entry["prompt"], entry["target"])
            acts = self._capture(rows, keep_lower_output=False).acts
        return acts[0][rows.prompt_mask[0].bool()].cpu()

    # ------------------------------------------------------------------ subject gate
    def detach(self) -> nn.Module:
        if self._subject_hook is not None:
            self._subject_hook.remove()
            self._subject_hook = None
        return super().detach()

    def _subject_depth(self) -> int:
        """Decoder layers below the subject key; 0: no gate."""
        cfg = self.config
        if not cfg.subject_tau:
            return 0
        if cfg.subject_layer is None:
            return min(DEFAULT_SUBJECT_LAYER, self.layer_index)
        if cfg.subject_layer > self.layer_index:
            self.detach()
            raise ValueError(
                f"subject_layer: {cfg.subject_layer} decoder layers do not lie below the "
                f"edited layer (index {self.layer_index}); choose at most {self.layer_index}, "
                f"None or subject_tau=0"
            )
        return cfg.subject_layer

    def _hand_up_lower_states(self, _module: nn.Module, _args: Any, output: Any) -> None:
        """Forward hook below the edited layer: this forward's residual stream there, for
        the subject gate of the same call (per thread, like its routing decision)."""
        self.layer.routing.lower = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def _lower_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The subject layer's states (B, T, H) of a left-padded prompt batch, its routing
        mask and its token ids; only the layers up to the subject layer run."""
        ids, mask = encode_prompts(self.format, prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with editing_mode(self.model):
            states = layer_output(
                self.model.base_model, self.layers, self._subject_depth(), ids, mask
            )
        return states, self._routing_mask(ids, mask), ids

    def _subject_centre(self) -> torch.Tensor:
        """The subject layer's mean state over neutral text's routed tokens, once."""
        if self.layer.subject_centre is None:
            states, mask, _ = self._lower_states(list(NEUTRAL_PROMPTS))
            weights = mask.to(states.dtype).unsqueeze(-1)
            self.layer.subject_centre = (states * weights).sum((0, 1)).float() / weights.sum()
        return self.layer.subject_centre

    def _subject_key(self, request: EditRequest) -> torch.Tensor:
        """The edit's subject key (`subject.py`); zeros, which leave its memory ungated,
        when the gate is off, the edit names no subject or its prompt does not hold it."""
        zero = torch.zeros(self.layer.weight.shape[0], device=self.device)
        if self._subject_hook is None or request.subject is None:
            return zero
        states, _, ids = self._lower_states([request.prompt])
        at = subject_end(self.tokenizer, ids[0].tolist(), request.subject)
        if at is None:
            return zero
        return centred_unit(states[0, at], self._subject_centre())

    # ------------------------------------------------------------------ one-time setup
    @torch.no_grad()
    def _calibrate(self) -> float:
        """The routing score unit and the key radius of this model, each calibrated once
        on neutral text unless the config fixes it (the radius lives in the layer).
        Neutral text rather than the unrelated pool: a pool drawn from the edited set
        shares its sentence forms, and would set the radius by the data, not the model."""
        if self.score_scale is None or self.layer.radius is None:
            acts, mask = self._prompt_batch_acts(list(NEUTRAL_PROMPTS))
            if self.score_scale is None:
                self.score_scale = score_unit(self.layer.base_layer(acts), mask)
            if self.layer.radius is None:
                self.layer.radius = background_radius(mean_inputs(acts, mask), RADIUS_QUANTILE)
        return self.score_scale

    @torch.no_grad()
    def _generate_prefixes(self) -> list[str]:
        """Short continuations of seed words sampled from the unedited model with the
        config's seed (the paper's augmentation), without touching the global RNG."""
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
                    top_k=cfg.prefix_top_k,
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
            "key_radius": self.key_radius,
            "prefixes": self.prefixes,
            "memories": [m.state() for m in self.layer.memories],
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for i, memory in enumerate(self.layer.memories):
            tensors.update(memory.tensors(f"memory.{i}"))
        if self.layer.subject_centre is not None:
            tensors["subject_centre"] = self.layer.subject_centre
        return tensors

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: WiseConfig, weight: torch.Tensor
    ) -> None:
        check.number(state, "score_scale", low=1e-12, optional=True)
        check.number(state, "key_radius", low=0.0, high=1.0, optional=True)
        check.strings(state, "prefixes", optional=True)
        memories = check.field(state, "memories", list)
        if "subject_centre" in check.tensors:
            check.tensor("subject_centre", (weight.shape[0],))
        edits = len(state["edit_log"])
        held: set[int] = set()
        for i, meta in enumerate(memories):
            check.field({f"memories[{i}]": meta}, f"memories[{i}]", dict)
            SideMemory.check_saved(check, meta, f"memory.{i}", weight.shape, config)
            ids = meta["edit_ids"]
            if any(
                not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < edits for e in ids
            ):
                check.fail(
                    STATE_FILE, f"memories[{i}].edit_ids", f"must be edit indices below {edits}"
                )
            if held & set(ids) or len(set(ids)) != len(ids):
                check.fail(STATE_FILE, f"memories[{i}].edit_ids", "repeats an edit")
            held |= set(ids)

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.score_scale = state["score_scale"]
        # the radius a save calibrated, unless its config names one (older saves: 0, off)
        if self.config.key_radius is None and state.get("key_radius") is not None:
            self.layer.radius = float(state["key_radius"])
        self.prefixes = state["prefixes"]
        if "subject_centre" in tensors:
            self.layer.subject_centre = tensors["subject_centre"].float().to(self.device)
        for i, meta in enumerate(state["memories"]):
            memory = self.layer.new_memory()
            memory.restore(meta, tensors, f"memory.{i}", self.config.edits_per_memory())
            if len(memory.keys) != len(memory.edit_ids):  # saved before the retrieval index
                memory.keys = memory.keys[:0]
                for index in memory.edit_ids:
                    memory.add_key(self._prompt_acts_of(index).float().mean(0))
            if len(memory.subject_keys) != len(memory.edit_ids):  # before the subject gate
                memory.subject_keys = memory.subject_keys[:0]
                for index in memory.edit_ids:
                    request = EditRequest.of_entry(self.edit_log[index])
                    memory.add_subject_key(self._subject_key(request))

    def _make_layer(self, module: nn.Module) -> WiseLayer:
        cfg = self.config
        return WiseLayer(module, cfg.route_candidates, cfg.key_radius, cfg.subject_tau)


class _NegativePool:
    """Unrelated prompts with their routed-token value-matrix inputs (t_i, I) and mean
    inputs (N, I), the keys hard negatives are chosen by."""

    def __init__(self, prompts: list[str], acts: list[torch.Tensor]) -> None:
        self.prompts, self.acts = prompts, acts
        self.keys = torch.stack([a.float().mean(0) for a in acts])

    def nearest(self, query: torch.Tensor, count: int, taken: set[str]) -> list[int]:
        """The ``count`` prompts most similar to an edit prompt's mean input ``query`` (I,)
        and not in ``taken``: the prompts a router most easily confuses with it."""
        picks = nearest(query.cpu(), self.keys, count + len(taken))
        return [i for i in picks if self.prompts[i] not in taken][:count]


def _stack_ragged(acts: list[torch.Tensor], device: torch.device) -> Acts:
    """Pad a list of (t_i, I) activations into (N, T, I) with a token mask (N, T)."""
    width = max(a.shape[0] for a in acts)
    out = torch.zeros((len(acts), width, acts[0].shape[1]), dtype=acts[0].dtype)
    lengths = [a.shape[0] for a in acts]
    _, mask = left_pad([[1] * n for n in lengths], 0)
    for row, a in enumerate(acts):
        out[row, width - a.shape[0] :] = a
    return out.to(device), mask.to(device)
