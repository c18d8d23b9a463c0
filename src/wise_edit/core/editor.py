"""What every editor shares, WISE and the baselines alike: putting a wrapper in place of
one module of the model (and taking it out again), serving (`generate`, forward,
`routed`), the one edit template, and `save_pretrained` / `from_pretrained`.

A method supplies a layer class, a `Draft` (what one edit trains, its loss and its
update) and a commit; `EditorBase.edit` does the rest in one place: validate, build
rows, capture the frozen lower layers, run `fit`, commit on success, log.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..families import check_value_module, get_submodule, weight_out_in
from ..neutral import NEUTRAL_PROMPTS, check_subject
from . import fastpath
from .attach import (
    cache_length,
    check_fingerprint,
    editing_mode,
    locate_layer,
    passed_cache,
    set_submodule,
    weight_fingerprint,
)
from .config import EditConfig
from .draft import Draft, EditRequest, EditResult
from .fastpath import Captured, capture
from .fit import SIDE_STEPS_LM, Fitted, StepLoss, fit, fitting
from .layer import AttachedLayer
from .persistence import CONFIG_FILE, CorruptSaveError, Saved, read_save, write_save
from .prompts import PromptFormat
from .rows import EditRows, build_rows, check_text, context_limit, encode_prompts, pad_id
from .rwlock import ReadWriteLock
from .seeds import unrelated_generator
from .validate import SaveChecker

logger = logging.getLogger(__name__)

# Rows per pass of the lower layers when several edits' rows are captured together
# (`_capture_each`): enough to fill a pass, few enough that sorting them by length
# leaves little padding
CAPTURE_ROWS = 64


class EditorBase:
    """Attaches a method's `AttachedLayer` to one linear module of a causal LM.

    Subclasses set ``method``, ``config_class`` and ``layer_class``, and implement
    `_draft` and `_commit` (editing) and `_state` / `_tensors` / `_restore` (persistence).
    The model is modified in place until `detach()`.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[EditConfig]]
    layer_class: ClassVar[type[AttachedLayer]]
    routes: ClassVar[bool] = True  # False: the edit applies to every input, unrouted
    retractable: ClassVar[bool] = False  # True: `retract` can take an edit back
    route_unit: ClassVar[str] = "edit memory"  # what `routed`'s indices count, for people

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        config: Any = None,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> None:
        """``config`` None: the method's preset for ``model``."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config if config is not None else self.config_class.for_model(model)
        self.target_path = config.resolve_target(model)
        self.layers, self.layer_index = locate_layer(
            model, self.target_path, config.resolve_layers_path(model)
        )
        module = get_submodule(model, self.target_path)
        if isinstance(module, AttachedLayer):
            raise ValueError(f"{self.target_path} already has an editor attached")
        check_value_module(module, self.target_path)
        self.format = PromptFormat.create(tokenizer, config.prompt_format)
        self.irrelevant_prompts = list(irrelevant_prompts or NEUTRAL_PROMPTS)
        if not self.irrelevant_prompts or not all(
            isinstance(p, str) and p.strip() for p in self.irrelevant_prompts
        ):
            raise ValueError("irrelevant_prompts must be non-empty strings")
        self.fingerprint = weight_fingerprint(module, self.target_path, model)
        self.edit_log: list[dict[str, Any]] = []
        # generation reads under `read`, a commit changes the state under `write`
        self.state_lock = ReadWriteLock()
        self.layer = self._make_layer(module)
        set_submodule(model, self.target_path, self.layer)
        self._hook = model.base_model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._attached = True

    def _make_layer(self, module: nn.Module) -> AttachedLayer:
        return self.layer_class(module)

    @classmethod
    def variant_of(cls, config: Any) -> str:
        """The method's variant a config selects, for run names ("" for none)."""
        return ""

    # ------------------------------------------------------------------ attach / detach
    def detach(self) -> nn.Module:
        """Put the original module back; the model is exactly the unedited one again."""
        if self._attached:
            self._hook.remove()
            set_submodule(self.model, self.target_path, self.layer.base_layer)
            self._attached = False
        return self.model

    def _check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError(
                f"this {type(self).__name__} was detached; attach a new one to edit again"
            )

    def _on_forward(self, _module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """Every forward of the backbone: a new sequence starts a decision, a forward that
        continues a KV cache keeps the one made at prefill."""
        past = passed_cache(kwargs)
        if past is not None and cache_length(past) > 0:
            self.layer.routing.hold()
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)  # GPT-2 passes it by position
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            ids = None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            mask = None if ids is None else torch.ones_like(ids)
        if mask is not None and ids is not None and ids.shape == mask.shape:
            mask = self._routing_mask(ids, mask)
        self.layer.routing.begin(mask, ids)

    def _routing_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The tokens the layer's routing decision reads: a chat template's fixed tokens
        are left out for layers that average a score over the sequence."""
        return self.format.content_mask(ids, mask) if self.layer.reads_content else mask

    # ------------------------------------------------------------------ serving
    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def num_edits(self) -> int:
        return len(self.edit_log)

    @property
    def edit_batch(self) -> int | None:
        """How many records `edit_many` writes in one update: 1 for methods that edit one
        at a time (all here but MEMIT's), None for all of them at once (MEMIT-MASS)."""
        return 1

    def __call__(self, **inputs: Any) -> Any:
        with self.state_lock.read():
            return self.model(**inputs)

    def generate(self, **inputs: Any) -> torch.Tensor:
        """`model.generate`; a per-sequence decision is held from the prompt for every
        new token. Safe to call from several threads, also while an edit trains: each call
        keeps its own decision and sees the edits committed when it started."""
        inputs.setdefault("pad_token_id", pad_id(self.tokenizer))
        with self.state_lock.read():
            return self.model.generate(**inputs)

    def last_decision(self) -> list[int] | None:
        """The edit memory each sequence of the calling thread's last forward or
        `generate` used, as decided at its prompt (-1: the unedited model); None when
        this thread has run no routed forward. Read after `generate` in the same thread,
        it names the memory that really answered, even if an edit committed since."""
        choice = self.layer.routing.choice
        return None if choice is None else choice.tolist()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The model behaves exactly as the unedited one inside this block."""
        with self.layer.disabled():
            yield

    @torch.no_grad()
    def routed(self, prompts: Sequence[str]) -> list[int]:
        """Which edit memory each prompt would use: WISE's side memory, GRACE's codebook
        entry, DEFER's counterfactual model (0); -1 = the unedited model. Methods that
        edit the weights themselves (``routes`` False) answer 0 for every prompt."""
        return self.routing_detail(prompts)[0]

    def memory_holding(self, edit_id: int) -> int | None:
        """The index `routed` gives for the prompts edit ``edit_id`` should reach, where
        the method keeps each edit in one place it can name (WISE's side memory); None
        here: routing then says only whether a prompt reached some edit memory."""
        return None

    @torch.no_grad()
    def routing_detail(self, prompts: Sequence[str]) -> tuple[list[int], list[float] | None]:
        """`routed` and, for methods that route by a score against a threshold, each
        prompt's score (the paper's Fig. 3), from one pass over the prompts."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        for prompt in prompts:
            check_text(prompt, "prompt")
        if not prompts:
            return [], []
        with self.state_lock.read():
            acts, mask = self._prompt_batch_acts(list(prompts))
            scores = self.layer.route_scores(acts, mask)
            choice = self.layer.route(acts, mask)
        return choice.tolist(), None if scores is None else scores.tolist()

    def summary(self) -> dict[str, Any]:
        """A few numbers about the editor's state, for benchmark reports."""
        steps = [e["steps"] for e in self.edit_log]
        edits = max(1, len(steps))
        # what a save's tensors hold and what the editor keeps in memory beside them, per
        # edit: the figures a long stream's disk and RAM grow by
        saved = _nbytes(self._tensors().values())
        return {
            "steps_per_edit": round(sum(steps) / edits, 1),
            "saved_kb_per_edit": round(saved / edits / 1e3, 1),
            "ram_kb_per_edit": round((saved + self._cache_bytes()) / edits / 1e3, 1),
        }

    def _cache_bytes(self) -> int:
        """Bytes the editor keeps beside its saved tensors (caches it derives)."""
        return 0

    # ------------------------------------------------------------------ editing
    def edit(
        self,
        prompt: str,
        target: str,
        meta: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
    ) -> EditResult:
        """Apply one edit. On any error the editor is left exactly as before the call.
        ``meta`` (JSON-serialisable) is kept with the edit in the log, e.g. where the
        edit came from. ``subject``: what the prompt is about, as written in it; kept in
        the log, and WISE's subject gate keys the edit on it."""
        self._check_attached()
        if meta is not None:
            meta = _json_copy(meta)
        request = EditRequest(prompt, target, _checked_subject(prompt, subject))
        started = time.perf_counter()
        with editing_mode(self.model):
            rows = self._edit_rows(prompt, target)
            lower = self._capture(rows, keep_lower_output=self.config.fast_path)
            draft = self._draft(rows, lower, request)
            fitted = self._fit(draft, rows, lower)
        result = self._result(request, fitted, draft, len(self.edit_log), started)
        with self.state_lock.write():
            self._commit(draft, result)
            self.edit_log.append(_log_entry(result, draft, request, meta))
        logger.info(
            "%s edit %d -> memory %d shard %d: %d steps, loss %.4f",
            self.method,
            result.index,
            result.memory,
            result.shard,
            result.steps,
            result.loss,
        )
        return result

    def _edit_together(
        self, requests: list[EditRequest], metas: list[dict[str, Any] | None]
    ) -> list[EditResult]:
        """Edits trained in one optimisation (`edit_many` with ``batch`` > 1): the same
        template as `edit`, with every step one forward of all the drafts' rows. Nothing
        is committed unless every edit trained; each result's ``seconds`` is the group's
        time over its size."""
        started, first = time.perf_counter(), len(self.edit_log)
        with editing_mode(self.model):
            rows = [self._edit_rows(r.prompt, r.target) for r in requests]
            lowers = self._capture_each(rows)
            drafts = self._drafts_together(rows, lowers, requests)
            fitted = self._fit_together(drafts, rows, lowers)
        seconds = (time.perf_counter() - started) / len(requests)
        results = [
            self._result(r, f, d, first + i, started, seconds)
            for i, (r, f, d) in enumerate(zip(requests, fitted, drafts))
        ]
        with self.state_lock.write():
            for result, draft, request, meta in zip(results, drafts, requests, metas):
                self._commit(draft, result)
                entry = _log_entry(result, draft, request, meta)
                self.edit_log.append({**entry, "batch": len(requests)})
        logger.info("%s: %d edits together, %.2f s each", self.method, len(results), seconds)
        return results

    def _check_batch(self) -> None:
        """Raise ValueError where this editor cannot train several edits at once."""
        raise ValueError(f"{self.method} edits one at a time: batch must be 1")

    def _drafts_together(
        self, rows: list[EditRows], lowers: list[Captured], requests: list[EditRequest]
    ) -> list[Draft]:
        """The drafts of edits trained together, indexed from the next edit on."""
        raise NotImplementedError

    def _joint_state(self, states: list[Any], sizes: list[int]) -> Any:
        """The layer state of one forward in which consecutive groups of ``sizes`` rows
        each compute with their own draft's state."""
        raise NotImplementedError

    def _capture_each(self, rows: list[EditRows]) -> list[Captured]:
        """`_capture` of several edits' rows in a few passes of the lower layers: the
        rows sorted by length into passes of `CAPTURE_ROWS`, so that little of a pass
        is padding, then each edit's rows laid out as its own capture would be."""
        joined = EditRows.join(rows, pad_id(self.tokenizer))
        lengths = joined.attention_mask.sum(1).tolist()
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        single: list[Captured] = [None] * len(lengths)  # type: ignore[list-item]
        for at in range(0, len(order), CAPTURE_ROWS):
            chunk = order[at : at + CAPTURE_ROWS]
            part, _ = joined.take(chunk)
            captured = self._capture(part, keep_lower_output=self.config.fast_path)
            width = captured.acts.shape[1]
            for k, row in enumerate(chunk):
                single[row] = captured.take([k], width - lengths[row])
        out, offset = [], 0
        for part in rows:
            out.append(Captured.join(single[offset : offset + len(part.input_ids)]))
            offset += len(part.input_ids)
            assert out[-1].acts.shape[:2] == part.input_ids.shape, "rows lost their own width"
        return out

    def _fit(self, draft: Draft, rows: EditRows, lower: Captured) -> Fitted:
        """Train ``draft`` on the edit's rows (inside `editing_mode`)."""
        forwards = itertools.count()

        def loss_fn() -> StepLoss:
            step_rows, step_lower = self._step_rows(rows, lower, next(forwards))
            state = draft.layer_state()
            with self.layer.trial(state):
                lm, answered = self._target_fit(step_rows, step_lower)
                for old_rows, old_lower in draft.rehearsal():
                    old_lm, old_answered = self._target_fit(old_rows, old_lower)
                    lm, answered = lm + old_lm, answered & old_answered
            return StepLoss(draft.loss(lm, state), lm, answered)

        return fit(
            loss_fn,
            draft.update,
            side_loss_fn=functools.partial(_side_loss, draft),
            **self._fit_settings(),
        )

    def _fit_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "max_steps": cfg.max_steps,
            "early_stop_loss": cfg.early_stop_loss,
            "patience": cfg.early_stop_patience,
            "stop_on": cfg.early_stop_on,
            "side_steps": cfg.side_steps,
            "side_lm_bound": SIDE_STEPS_LM,
        }

    def _fit_together(
        self, drafts: list[Draft], rows: list[EditRows], lowers: list[Captured]
    ) -> list[Fitted]:
        """Train several drafts whose states are independent (each edit's rows compute
        with its own state only): every step is one forward of all the rows of the drafts
        still training and one backward of their summed losses, and each draft runs its
        own `fitting`, so it takes the steps, and stops where, it would alone (up to
        floating-point rounding of the larger batch)."""
        pending: list[tuple[int, torch.Tensor]] = []
        runs: dict[int, Any] = {}
        fitted: list[Fitted | None] = [None] * len(drafts)
        for j, draft in enumerate(drafts):

            def defer(loss: torch.Tensor, j: int = j) -> None:
                pending.append((j, loss))

            runs[j] = fitting(
                defer,
                side_update=draft.update,
                side_loss_fn=functools.partial(_side_loss, draft),
                **self._fit_settings(),
            )
            next(runs[j])
        forwards = [0] * len(drafts)
        while runs:
            states = {j: drafts[j].layer_state() for j in runs}
            segments: list[tuple[EditRows, Captured]] = []
            owners: list[int] = []
            for j in runs:
                step = self._step_rows(rows[j], lowers[j], forwards[j])
                forwards[j] += 1
                for segment in [step, *drafts[j].rehearsal()]:
                    segments.append(segment)
                    owners.append(j)
            sizes = [len(r.input_ids) for r, _ in segments]
            joined = EditRows.join([r for r, _ in segments], pad_id(self.tokenizer))
            with self.layer.trial(self._joint_state([states[j] for j in owners], sizes)):
                logits = self._target_logits(joined, Captured.join([c for _, c in segments]))
            lm: dict[int, torch.Tensor] = {}
            answered: dict[int, torch.Tensor] = {}
            for (part, _), j, part_logits in zip(segments, owners, logits.split(sizes)):
                own = part_logits[:, part_logits.shape[1] - part.targets.shape[1] :]
                loss, hits = _target_fit_of(own, part.targets)
                lm[j] = lm[j] + loss if j in lm else loss
                answered[j] = answered[j] & hits if j in answered else hits
            for j in list(runs):
                try:
                    runs[j].send(StepLoss(drafts[j].loss(lm[j], states[j]), lm[j], answered[j]))
                except StopIteration as done:
                    fitted[j] = done.value
                    del runs[j]
            if pending:  # one backward for every draft's full step
                params = [p for j, _ in pending for p in drafts[j].params]
                grads = torch.autograd.grad(sum(loss for _, loss in pending), params)
                at = 0
                for j, _ in pending:
                    count = len(drafts[j].params)
                    drafts[j].apply(grads[at : at + count])
                    at += count
                pending.clear()
        return fitted  # type: ignore[return-value]

    def _step_rows(self, rows: EditRows, lower: Captured, step: int) -> tuple[EditRows, Captured]:
        """The rows forward number ``step`` (from 0) of an edit trains on: all of them."""
        return rows, lower

    # ------------------------------------------------------------------ retraction
    def retract(self, edit_id: int) -> dict[str, Any]:
        """Take edit ``edit_id`` back: afterwards the model answers as if it had never
        been made, and every other edit still holds. The edit stays in the log, marked
        ``retracted`` (with what the retraction cost), so indices and resumed streams keep
        their meaning. What holds the edit is rebuilt from the log without it; the
        rebuild trains outside the lock and is swapped in atomically. Methods whose edits
        are spread through shared weights (FT-L, FT-EWC, DEFER) raise `NotImplementedError`.
        """
        self._check_attached()
        if not self.retractable:
            raise NotImplementedError(
                f"{self.method} cannot retract an edit: every edit changes the same shared "
                "weights, so one cannot be taken out; re-run the stream without it"
            )
        entry = self._live_entry(edit_id)
        started = time.perf_counter()
        with editing_mode(self.model):
            install, retrained = self._rebuild_without(edit_id)
        cost = {"retrained_edits": retrained, "seconds": round(time.perf_counter() - started, 3)}
        with self.state_lock.write():
            install()
            entry["retracted"] = cost
        logger.info("%s edit %d retracted: %s", self.method, edit_id, cost)
        return cost

    def _live_entry(self, edit_id: Any) -> dict[str, Any]:
        """The log entry of an applied, not yet retracted edit, or a ValueError."""
        if not isinstance(edit_id, int) or isinstance(edit_id, bool):
            raise TypeError(f"edit_id must be an int, got {edit_id!r}")
        if not 0 <= edit_id < len(self.edit_log):
            raise ValueError(f"edit_id {edit_id} is not in the log of {len(self.edit_log)} edits")
        entry = self.edit_log[edit_id]
        if entry.get("retracted"):
            raise ValueError(f"edit {edit_id} is already retracted")
        return entry

    def live_edits(self) -> list[int]:
        """Indices of the edits that hold (not retracted)."""
        return [i for i, e in enumerate(self.edit_log) if not e.get("retracted")]

    def _rebuild_without(self, edit_id: int) -> tuple[Callable[[], None], int]:
        """Rebuild, aside, what holds ``edit_id`` from the log without it; return the
        function that installs the rebuilt part and the number of edits retrained."""
        raise NotImplementedError

    def _draft(self, rows: EditRows, lower: Captured, request: EditRequest) -> Draft:
        """What this edit trains, starting from the committed state."""
        raise NotImplementedError

    def _commit(self, draft: Draft, result: EditResult) -> None:
        """Make a trained draft part of the editor's state."""
        raise NotImplementedError

    def _row_prefixes(self) -> list[str]:
        """Augmentation prefixes each edit is also trained behind (WISE); none by default."""
        return []

    def edit_many(
        self,
        records: Iterable[Mapping[str, Any] | tuple[str, str]],
        progress: bool = False,
        batch: int | None = None,
        metas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[EditResult]:
        """Edit a stream, continuing the same state. A mapping may name its ``subject``
        (see `edit`); ``metas``: one `edit` ``meta`` per record.

        ``batch`` K > 1: K edits at a time, each group one update, where the method can:
        WISE whose side memories take one edit each (the defaults) trains a group in one
        optimisation in which each edit takes the steps and stops where it would alone,
        so the edits equal sequential ones up to floating-point rounding; MEMIT and
        AlphaEdit solve for a group at once. A group is committed whole or not at all.
        None: the method's own `edit_batch` (1 but for MEMIT-MASS, which takes all)."""
        if batch is not None and (
            not isinstance(batch, int) or isinstance(batch, bool) or batch < 1
        ):
            raise ValueError(f"batch must be None or an int >= 1, got {batch!r}")
        self._check_attached()
        items = [_prompt_target(r) for r in records]
        batch = batch or self.edit_batch or max(1, len(items))
        if batch > 1:
            self._check_batch()
        metas = list(metas) if metas is not None else [None] * len(items)
        if len(metas) != len(items):
            raise ValueError(f"{len(metas)} metas for {len(items)} records")
        results: list[EditResult] = []
        name = self.method or "editing"
        bar = tqdm(total=len(items), desc=name, unit="edit", disable=not progress)
        for start in range(0, len(items), batch):
            group = items[start : start + batch]
            group_metas = metas[start : start + batch]
            if len(group) == 1:
                prompt, target, subject = group[0]
                results.append(self.edit(prompt, target, group_metas[0], subject=subject))
            else:
                requests = [EditRequest(p, t, _checked_subject(p, s)) for p, t, s in group]
                copies = [None if m is None else _json_copy(m) for m in group_metas]
                results += self._edit_together(requests, copies)
            bar.update(len(group))
            bar.set_postfix(s_per_edit=f"{results[-1].seconds:.2f}", steps=results[-1].steps)
        bar.close()
        return results

    def _edit_rows(self, prompt: str, target: str) -> EditRows:
        """Validated training rows of one edit, on the editor's device."""
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise TypeError("prompt and target must be strings")
        rows = build_rows(
            self.format, prompt, target, self._row_prefixes(), stop=self.config.train_stop
        )
        limit = context_limit(self.model.config)
        if limit is not None and rows.input_ids.shape[1] > limit:
            raise ValueError(
                f"edit is {rows.input_ids.shape[1]} tokens with its prefix, longer than the "
                f"model's context of {limit} tokens"
            )
        return rows.to(self.device)

    def _capture(self, rows: EditRows, keep_lower_output: bool = True) -> Captured:
        """The frozen part of the forward (everything below the wrapped module)."""
        return self._capture_ids(rows.input_ids, rows.attention_mask, keep_lower_output)

    def _capture_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, keep_lower_output: bool
    ) -> Captured:
        return capture(
            self.model.base_model,
            self.layers,
            self.layer_index,
            self.layer,
            ids,
            mask,
            keep_lower_output=keep_lower_output,
        )

    def _lm_loss(self, rows: EditRows, lower: Captured) -> torch.Tensor:
        """Target NLL of the rows with the wrapped layer as it currently computes."""
        return self._target_fit(rows, lower)[0]

    def _target_fit(self, rows: EditRows, lower: Captured) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' target NLL and whether greedy decoding already says every target
        token (teacher-forced), from one forward of the wrapped layer as it computes now."""
        return _target_fit_of(self._target_logits(rows, lower), rows.targets)

    def _target_logits(self, rows: EditRows, lower: Captured) -> torch.Tensor:
        """Logits (R, n, V) at the positions that predict the rows' n target tokens, from
        one forward of the wrapped layer as it computes now (the fast path or the whole
        model, as configured)."""
        n = rows.targets.shape[1]
        if self.config.fast_path:
            return fastpath.fast_target_logits(
                self.model,
                self.layers,
                self.layer_index,
                lower,
                rows.input_ids,
                rows.attention_mask,
                n,
            )
        return fastpath.full_target_logits(self.model, rows.input_ids, rows.attention_mask, n)

    @torch.no_grad()
    def _prompt_batch_acts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the wrapped module (B, T, I) of a left-padded prompt batch in the
        editor's format, and the mask (B, T) of the tokens routing reads."""
        ids, mask = encode_prompts(self.format, prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with editing_mode(self.model):
            acts = self._capture_ids(ids, mask, keep_lower_output=False).acts
        return acts, self._routing_mask(ids, mask)

    def _irrelevant_sample(self, count: int, index: int | None = None) -> list[str]:
        """Unrelated prompts for edit ``index`` (default: the next one), drawn from the
        pool by a generator seeded from the edit index (reproducible, the same after
        save/load and when a retraction retrains the edit)."""
        index = len(self.edit_log) if index is None else index
        gen = unrelated_generator(self.config.seed, index)
        count = min(count, len(self.irrelevant_prompts))
        picks = torch.randperm(len(self.irrelevant_prompts), generator=gen)[:count].tolist()
        return [self.irrelevant_prompts[i] for i in picks]

    def _result(
        self,
        request: EditRequest,
        fitted: Fitted,
        draft: Draft,
        index: int,
        started: float,
        seconds: float | None = None,
    ) -> EditResult:
        return EditResult(
            index=index,
            prompt=request.prompt,
            target=request.target,
            steps=fitted.steps,
            loss=fitted.loss,
            lm_loss=fitted.lm_loss,
            seconds=time.perf_counter() - started if seconds is None else seconds,
            memory=draft.memory,
            shard=draft.shard,
            answered_at=fitted.answered_at,
            side_steps=fitted.side_steps,
        )

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        """Everything but tensors that `from_pretrained` needs (JSON)."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def snapshot(self) -> Saved:
        """Everything a save holds, as it is now."""
        state = {"fingerprint": self.fingerprint, "edit_log": self.edit_log, **self._state()}
        return Saved(self.method, self.config.to_dict(), state, self._tensors())

    def save_pretrained(self, path: str | Any, replace: bool = False) -> None:
        """Write ``editor_config.json``, ``editor_state.json`` and
        ``editor_model.safetensors`` to the folder ``path`` (no pickle), atomically and
        under a lock. Only a missing or empty folder or a save of this method is written
        to (``replace``: a save of any method); anything else raises before writing."""
        write_save(path, self.snapshot(), replace)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        tokenizer: Any,
        path: str | Any,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> Any:
        """Re-attach saved edits to ``model``. Every field and tensor is checked against
        the config and the model before anything is attached; a save made for another
        model, layer or method is refused. `wise_edit.load_editor` picks the method."""
        saved = read_save(path)
        if saved.method != cls.method:
            raise ValueError(f"{path} holds {saved.method} edits, not {cls.method}")
        try:
            config = cls.config_class.from_dict(saved.config)
        except (ValueError, TypeError) as err:
            raise CorruptSaveError(f"{path}/{CONFIG_FILE}: {err}") from None
        target = config.resolve_target(model)
        module = get_submodule(model, target)
        check = SaveChecker(path, saved.tensors)
        check_fingerprint(
            weight_fingerprint(module, target, model),
            check.field(saved.state, "fingerprint", dict),
            path,
        )
        check.edit_log(saved.state)
        cls._check_saved(check, saved.state, config, weight_out_in(module))
        check.no_other_tensors()
        return cls._from_saved(model, tokenizer, config, irrelevant_prompts, saved)

    @classmethod
    def _from_saved(
        cls, model: nn.Module, tokenizer: Any, config: Any, irrelevant_prompts: Any, saved: Saved
    ) -> Any:
        """The editor of a checked save: made, then given the saved log and state."""
        editor = cls(model, tokenizer, config, irrelevant_prompts)
        editor.edit_log = saved.state["edit_log"]
        editor._restore(saved.state, saved.tensors)
        return editor

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: Any, weight: torch.Tensor
    ) -> None:
        """Check the method's fields and tensors (``weight``: the wrapped matrix,
        (out, in)); raise `CorruptSaveError` naming the first thing wrong."""
        raise NotImplementedError


def _prompt_target(
    record: Mapping[str, Any] | tuple[str, str],
) -> tuple[str, str, str | None]:
    if isinstance(record, Mapping):
        if "prompt" not in record or "target" not in record:
            raise ValueError(
                f"an edit record needs 'prompt' and 'target' keys, got {sorted(record)}"
            )
        return record["prompt"], record["target"], record.get("subject")
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return record[0], record[1], None
    raise ValueError(f"an edit record is a mapping or a (prompt, target) pair, got {record!r}")


def _target_fit_of(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target NLL and whether greedy decoding says every target token, from the logits
    (R, n, V) at the target positions."""
    return fastpath.target_loss(logits, targets), fastpath.greedy_hits(logits, targets)


def _side_loss(draft: Draft) -> torch.Tensor:
    """The draft's side terms as they stand (`fit`'s ``side_loss_fn``); zero without any."""
    side = draft.side_loss(draft.layer_state())
    return side if side is not None else torch.zeros(())


def _json_copy(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an edit's ``meta``, and proof that it can be saved."""
    return json.loads(json.dumps(dict(meta)))


def _log_entry(
    result: EditResult, draft: Draft, request: EditRequest, meta: dict[str, Any] | None
) -> dict[str, Any]:
    entry = {**asdict(result), **draft.log_fields()}
    if request.subject is not None:
        entry["subject"] = request.subject
    return entry if meta is None else {**entry, "meta": meta}


def _checked_subject(prompt: Any, subject: Any) -> str | None:
    """``subject`` when it is text ``prompt`` names (`neutral.check_subject`); a
    subject the prompt does not name is a caller's mistake."""
    if subject is None:
        return None
    if not isinstance(subject, str) or not subject.strip():
        raise TypeError(f"subject must be a non-empty string or None, got {subject!r}")
    if isinstance(prompt, str):
        check_subject(prompt, subject)
    return subject


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
