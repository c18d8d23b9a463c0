"""`WiseEditor`: WISE attached to a causal LM. The edit template (rows, capture, fit,
commit) is `EditorBase.edit`; this file gathers what one WISE edit trains from the other
files of this folder - where it goes (`bank.py`), its unrelated prompts
(`negatives.py`), its loss (`draft.py`) - and keeps the per-model calibration
(`calibration.py`), measured once when the editor is made."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core import fastpath
from ..core.attach import editing_mode
from ..core.draft import EditRequest, EditResult
from ..core.editor import EditorBase
from ..core.fastpath import Captured, Head
from ..core.rows import EditRows, build_answer_rows, context_limit, left_pad, stack_ragged
from ..core.validate import SaveChecker
from .bank import MemoryBank, Plan
from .calibration import Calibration, calibrate
from .compact import initial_factors
from .config import WiseConfig
from .draft import WiseDraft
from .layer import WiseLayer
from .memory import SideMemory, check_saved_memories, load_memories
from .negatives import POOL_BATCH, NegativePool, PromptActs, negatives, routed_rows
from .router import Acts, Factors, Grouped, mean_inputs
from .subject import SubjectKeys, subject_depth

__all__ = ["EditResult", "WiseEditor"]


class WiseEditor(EditorBase):
    """Lifelong editing of one causal LM with WISE.

    The model is modified in place: its value projection is replaced by a `WiseLayer`
    until `detach()`. Making the editor calibrates it to the model (`calibration.py`;
    ``calibration`` given: a save's). Editing state lives on this object and saves with
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
        calibration: Calibration | None = None,
    ) -> None:
        super().__init__(model, tokenizer, config, irrelevant_prompts)
        self.bank = MemoryBank(self.layer, self.config)
        routing, limit = self.config.routing, context_limit(model.config)
        try:
            depth = subject_depth(routing.subject_tau, routing.subject_layer, self.layer_index)
            longest = max(self.config.prefixes.lengths, default=0)
            if limit is not None and longest >= limit:
                raise ValueError(
                    f"prefixes.lengths: {longest} tokens do not fit the model's context of "
                    f"{limit} tokens with an edit behind them"
                )
        except ValueError:
            super().detach()  # nothing stays attached
            raise
        self._subjects = SubjectKeys(self, depth) if depth else None
        if not depth:
            self.layer.subject_tau = 0.0
        # edit id -> (t, I), derived, on the CPU in half precision: kept for every edit (replay
        # samples any earlier one), so it would otherwise outweigh a compact memory
        self._prompt_acts: dict[int, torch.Tensor] = {}
        self._header: tuple[int, ...] | None = None  # see `_capture_ids`
        self._head: Head | None = None
        self.calibration = calibrate(self, calibration or Calibration(), self._subjects)
        self.layer.radius = self.calibration.key_radius  # type: ignore[assignment]
        self.layer.subject_centre = self.calibration.subject_centre
        self._pool = None
        if self.config.negatives.hard:
            pool, seed = self.irrelevant_prompts, self.config.seed
            self._pool = NegativePool.build(pool, seed, self._prompt_batch_acts)

    @classmethod
    def variant_of(cls, config: WiseConfig) -> str:
        return config.memory.mode

    # ------------------------------------------------------------------ inspection
    @property
    def memories(self) -> tuple[SideMemory, ...]:
        return tuple(self.layer.memories)  # type: ignore[arg-type]

    def memory_holding(self, edit_id: int) -> int | None:
        return self.bank.holding(edit_id)

    @property
    def key_radius(self) -> float:
        """The radius routing uses (`routing.key_radius`, or the calibrated one)."""
        return self.layer.radius

    @property
    def thresholds(self) -> list[float]:
        return [m.epsilon for m in self.memories]

    @torch.no_grad()
    def activation_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """Activation score of each prompt against each side memory: (memories, prompts)."""
        if not self.memories:
            return torch.zeros((0, len(prompts)))
        return self.layer.scores(*self._prompt_batch_acts(list(prompts))).cpu()

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "memories": len(self.memories),
            "thresholds": self.thresholds,
            "key_radius": self.key_radius,
        }

    def _cache_bytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self._prompt_acts.values())

    # ------------------------------------------------------------------ one edit
    def _row_prefixes(self) -> list[str]:
        return self.calibration.prefixes or []

    def _step_rows(self, rows: EditRows, lower: Captured, step: int) -> tuple[EditRows, Captured]:
        """The bare prompt and ``prefixes.per_step`` of the prefixed rows, the next ones
        in turn at each forward, so that a few consecutive steps train every prefix."""
        k, prefixed = self.config.prefixes.per_step, len(rows.input_ids) - 1
        if k is None or k >= prefixed:
            return rows, lower
        index = [0] + sorted({1 + (step * k + j) % prefixed for j in range(k)})
        taken, start = rows.take(index)
        return taken, lower.take(index, start)

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> WiseDraft:
        return self._draft_for(self.bank.plan(), rows, lower, len(self.edit_log), request)

    def _draft_for(
        self,
        plan: Plan,
        rows: EditRows,
        lower: Captured,
        index: int,
        request: EditRequest,
        pending: dict[int, torch.Tensor] | None = None,
        prompt_acts: PromptActs | None = None,
    ) -> WiseDraft:
        """The draft of edit ``index`` under ``plan``; its random draws depend on the
        edit's index only, so retraining it in a rebuild draws the same. ``pending``:
        the prompt inputs of the edits trained together with it that come before it;
        ``prompt_acts``: where its unrelated prompts' inputs come from (default: a
        forward of them)."""
        cfg = self.config
        pending = pending or {}
        query = mean_inputs(lower.acts[:1], rows.prompt_mask[:1])[0]
        drawn = self._irrelevant_sample(cfg.negatives.random, index)
        unrelated = negatives(
            drawn,
            prompt_acts or self._prompt_batch_acts,
            self._pool,
            query,
            cfg.negatives.hard,
            self.device,
        )
        replay = self.bank.replay_ids(plan, index, list(pending))
        held = self.bank.rehearsal_ids(plan, index)
        start = None
        if isinstance(plan.base, Factors):
            tokens = lower.acts[rows.attention_mask.bool()]
            centre = unrelated[0][unrelated[1].bool()].float().mean(0)
            start = initial_factors(tokens, self.layer.weight.shape[0], cfg.memory.rank, centre)
        return WiseDraft(
            cfg,
            plan,
            (lower.acts, rows.prompt_mask),
            unrelated,
            self._stacked_prompt_acts(replay, pending) if replay else None,
            self.calibration.score_scale,  # type: ignore[arg-type]
            self._rehearsal(held),
            self._subject_key(request),
            start,
        )

    # ------------------------------------------------------------------ edits together
    def _check_batch(self) -> None:
        self.bank.check_batchable()

    def _drafts_together(
        self, rows: list[EditRows], lowers: list[Captured], requests: list[EditRequest]
    ) -> list[WiseDraft]:
        """Each edit in a memory of its own, drawn as it would be alone; the unrelated
        prompts of all of them from one forward, and each replaying the ones before it."""
        first = len(self.edit_log)
        plans = self.bank.plans(len(requests))
        drawn = [
            self._irrelevant_sample(self.config.negatives.random, first + i)
            for i in range(len(requests))
        ]
        prompt_acts = self._prompt_acts_once(sorted({p for d in drawn for p in d}))
        drafts: list[WiseDraft] = []
        pending: dict[int, torch.Tensor] = {}
        for i, (plan, part, lower, request) in enumerate(zip(plans, rows, lowers, requests)):
            draft = self._draft_for(plan, part, lower, first + i, request, pending, prompt_acts)
            acts, mask = draft.edit_acts
            pending[first + i] = _kept(acts[0][mask[0].bool()])
            drafts.append(draft)
        return drafts

    def _prompt_acts_once(self, prompts: list[str]) -> PromptActs:
        """`_prompt_batch_acts` for any of ``prompts``, all computed now in a few
        forwards (`POOL_BATCH` prompts of about one length each)."""
        rows: dict[str, torch.Tensor] = {}
        prompts = sorted(prompts, key=lambda p: len(self.format.prompt_ids(p)))  # less padding
        for i in range(0, len(prompts), POOL_BATCH):
            chunk = prompts[i : i + POOL_BATCH]
            rows.update(zip(chunk, routed_rows(self._prompt_batch_acts(chunk))))

        def prompt_acts(asked: list[str]) -> Acts:
            return stack_ragged([rows[p] for p in asked], self.device)

        return prompt_acts

    def _joint_state(self, states: list[Any], sizes: list[int]) -> Grouped:
        return Grouped(tuple(states), tuple(sizes))

    def _rehearsal(self, held: list[int]) -> list[tuple[EditRows, Captured]]:
        """Rows of earlier edits trained again, with their lower part captured once."""
        if not held:
            return []
        pairs = [(self.edit_log[i]["prompt"], self.edit_log[i]["target"]) for i in held]
        rows = build_answer_rows(self.format, pairs, stop=self.config.train_stop).to(self.device)
        return [(rows, self._capture(rows, keep_lower_output=self.config.fast_path))]

    def _commit(self, draft: Any, result: EditResult) -> None:
        self._fold(self.bank.memory_for(draft.plan), draft, result.index)

    def _fold(self, memory: SideMemory, draft: WiseDraft, index: int) -> None:
        acts, mask = draft.edit_acts
        self._prompt_acts[index] = _kept(acts[0][mask[0].bool()])
        key = self._prompt_acts[index].float().mean(0)
        step = draft.trained()
        keys = (key, draft.subject_key)
        self.bank.fold(memory, draft.plan, index, step, keys, self._stacked_prompt_acts)

    # ------------------------------------------------------------------ retraction
    def _rebuild_without(self, edit_id: int) -> tuple[Callable[[], None], int]:
        """Retrain the side memory that holds ``edit_id`` from scratch on its other edits,
        in their order, each with its own random draws. Retrieve: one small memory; a
        memory that was closed stays closed, holding its edits unmerged. Merge: the one
        memory holds every edit, so every other edit is retrained, each drawn with the
        index it has among the live edits - the memory a stream without the edit builds."""
        number = self.memory_holding(edit_id)
        assert number is not None, f"live edit {edit_id} is in no side memory"
        old = self.memories[number]
        kept = [i for i in old.edit_ids if i != edit_id]
        draws = kept if self.config.memory.mode == "retrieve" else list(range(len(kept)))
        fresh = SideMemory(self.layer.weight.shape, self.layer.weight.device, old.rank)
        for index, draw in zip(kept, draws):
            entry = self.edit_log[index]
            rows = self._edit_rows(entry["prompt"], entry["target"])
            lower = self._capture(rows, keep_lower_output=self.config.fast_path)
            plan = self.bank.plan_in(fresh, number)
            draft = self._draft_for(plan, rows, lower, draw, EditRequest.of_entry(entry))
            self._fit(draft, rows, lower)
            self._fold(fresh, draft, index)
        if old.closed:
            fresh.close()

        def install() -> None:
            self.layer.memories[number] = fresh

        return install, len(kept)

    # ------------------------------------------------------------------ the frozen part
    def _capture_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, keep_lower_output: bool
    ) -> Captured:
        """Rows that start with the prompt format's fixed header (a chat template's system
        turn, half of a short chat prompt's tokens) run only their own tokens, attending to
        the header's cached keys and values: the layers below the edited one never
        change, so the header's part is the same in every row of every edit."""
        head = self._head_of(ids, mask)
        if head is None:
            return super()._capture_ids(ids, mask, keep_lower_output)
        captured = fastpath.capture_after_head(
            self.model.base_model,
            self.layers,
            self.layer_index,
            self.layer,
            ids,
            mask,
            head,
            keep_lower_output,
        )
        routing = self.layer.routing
        if routing.lower is not None and routing.lower.shape[1] != ids.shape[1]:
            # the subject layer's states for the gate, read only on the prompt's own
            # tokens (the routing mask leaves the header out): zeros there
            tail, size = routing.lower, len(head.ids)
            routing.lower = fastpath.with_head(
                tail, tail.new_zeros(size, tail.shape[-1]), mask.sum(1), size, ids.shape[1]
            )
        return captured

    def _head_of(self, ids: torch.Tensor, mask: torch.Tensor) -> Head | None:
        """The cached header if every row starts with it and goes on after it."""
        if not self.config.fast_path:
            return None
        if self._header is None:  # the tokens any two prompts share at the start
            first, second = (self.format.prompt_ids(p) for p in ("Who?", "When was it?"))
            self._header = fastpath.shared_head(*left_pad([first, second], 0))
        size = len(self._header)
        if size < MIN_HEADER_TOKENS:
            return None
        header = torch.tensor(self._header, device=ids.device)
        for row, length in zip(ids, mask.sum(1).tolist()):
            start = len(row) - length
            if length <= size or not torch.equal(row[start : start + size], header):
                return None
        if self._head is None:
            self._head = fastpath.capture_head(
                self.model.base_model, self.layers, self.layer_index, self.layer, self._header
            )
        return self._head

    # ------------------------------------------------------------------ edit prompts
    def _stacked_prompt_acts(
        self, edit_ids: Sequence[int], pending: dict[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt activations of past edits (or of ``pending`` ones, not logged yet),
        padded into one batch. Cached per edit (they are frozen below the edited layer);
        after loading, computed exactly as when the edit was made (row 0 of its own row
        batch), so that a resumed stream gives the same thresholds and replay losses, bit
        for bit, as one never interrupted."""
        pending = pending or {}
        for index in edit_ids:
            if index in pending:
                continue
            if index not in self._prompt_acts:
                entry = self.edit_log[index]
                with editing_mode(self.model):
                    rows = self._edit_rows(entry["prompt"], entry["target"])
                    acts = self._capture(rows, keep_lower_output=False).acts
                self._prompt_acts[index] = _kept(acts[0][rows.prompt_mask[0].bool()])
        acts = [pending[i] if i in pending else self._prompt_acts[i] for i in edit_ids]
        return stack_ragged(acts, self.device)

    # ------------------------------------------------------------------ subject keys
    def detach(self) -> nn.Module:
        if self._subjects is not None:
            self._subjects.remove()
            self._subjects = None
        return super().detach()

    def _subject_key(self, request: EditRequest) -> torch.Tensor:
        """The edit's subject key (`subject.py`); zeros, which leave its memory ungated,
        when the gate is off, the edit names no subject or its prompt lacks it."""
        key = None
        if self._subjects is not None:
            key = self._subjects.key(request, self.calibration.subject_centre)  # type: ignore[arg-type]
        return torch.zeros(self.layer.weight.shape[0], device=self.device) if key is None else key

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        cal = self.calibration
        return {
            "score_scale": cal.score_scale,
            "key_radius": cal.key_radius,
            "prefixes": cal.prefixes,
            "memories": [m.meta() for m in self.memories],
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.layer.memories.state_dict(prefix="memories."))
        if self.calibration.subject_centre is not None:
            tensors["subject_centre"] = self.calibration.subject_centre
        return tensors

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: WiseConfig, weight: torch.Tensor
    ) -> None:
        check.number(state, "score_scale", low=1e-12, optional=True)
        check.number(state, "key_radius", low=0.0, high=1.0, optional=True)
        check.strings(state, "prefixes", optional=True)
        if "subject_centre" in check.tensors:
            check.tensor("subject_centre", (weight.shape[0],))
        check_saved_memories(check, state, config, weight.shape)

    @classmethod
    def _from_saved(
        cls, model: nn.Module, tokenizer: Any, config: WiseConfig, pool: Any, saved: Any
    ) -> WiseEditor:
        state, tensors = saved.state, saved.tensors
        known = Calibration(
            state["score_scale"],
            state.get("key_radius"),  # the radius a save calibrated, unless its config names one
            state["prefixes"],
            tensors.get("subject_centre"),
        )
        editor = cls(model, tokenizer, config, pool, calibration=known)
        editor.edit_log = state["edit_log"]
        editor._load_memories(state["memories"], tensors)
        return editor

    def _load_memories(self, metas: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
        """The saved memories; keys a save predates (the retrieval index, the subject
        gate) derived from the edit log, as they were computed when each edit was made."""

        def keys(ids: Sequence[int]) -> torch.Tensor:
            self._stacked_prompt_acts(ids)
            return torch.stack([self._prompt_acts[e].float().mean(0) for e in ids])

        def subject_keys(ids: Sequence[int]) -> torch.Tensor:
            entries = [EditRequest.of_entry(self.edit_log[e]) for e in ids]
            return torch.stack([self._subject_key(r) for r in entries])

        per_group = self.config.edits_per_memory()
        load_memories(
            self.layer, metas, tensors, per_group, {"keys": keys, "subject_keys": subject_keys}
        )

    def _make_layer(self, module: nn.Module) -> WiseLayer:
        routing = self.config.routing
        return WiseLayer(
            module,
            routing.candidates,
            0.0,
            routing.subject_tau,
            self.config.memory.rank,
            gate=routing.gate,
        )


# A header shorter than this is not worth its extra forward and cache (a raw prompt's BOS)
MIN_HEADER_TOKENS = 8


def _kept(acts: torch.Tensor) -> torch.Tensor:
    """An edit's prompt activations as the editor keeps them (see ``_prompt_acts``)."""
    return acts.to("cpu", torch.bfloat16)  # the float32 range: no overflow on any model
