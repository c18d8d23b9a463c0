"""What ROME, MEMIT and AlphaEdit share: locate-then-edit of FFN value matrices by a
closed-form update, on the same interface as the other editors.

One edit (or one batch of edits) runs in three parts, as in the reference code
(kmeng01/memit):

1. the value: a short optimisation of a vector δ added, at the subject's last token, to
   the output of the place that holds the fact (ROME: the value matrix's output,
   `rome/compute_v.py`; MEMIT: the residual stream after the last edited layer,
   `memit/compute_z.py`), over the edit's rows (the prompt behind a few context prefixes)
   with a KL term on "{subject} is a" and a norm penalty; v* is the original output
   there plus δ. This runs through `core.fit`, like every other method's edit.
2. the keys: the value matrix's inputs at the subject's last token, averaged over the
   contexts (`rome/compute_u.py`, `memit/compute_ks.py`).
3. the update: a pure function of keys, residuals and the key statistics C
   (`closed_form.py`, `layer_stats.py`), added to a `DeltaLayer`'s ``delta``.

An editor here wraps a range of decoder layers' value matrices: the template of
`EditorBase` (one wrapped module) holds the last of them, the one the fast editing
forward starts from; the others are attached beside it. The original weights are never
written, so `detach()` gives the model back exactly, and a save holds only the deltas.
Edits change shared weights: they are not routed and cannot be retracted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core import fastpath
from ..core.attach import check_fingerprint, editing_mode, set_submodule, weight_fingerprint
from ..core.config import EditConfig
from ..core.draft import EditRequest, EditResult
from ..core.editor import EditorBase, _checked_subject
from ..core.fastpath import Captured, hidden_of
from ..core.fit import Fitted, StepLoss, adam_update, fit
from ..core.layer import AttachedLayer
from ..core.persistence import Saved
from ..core.rows import EditRows, left_pad, pad_id
from ..core.validate import SaveChecker
from ..families import check_value_module, decoder_layers, get_submodule
from ..wise.calibration import generate_prefixes
from ..wise.router import subject_end
from .finetune import DeltaLayer
from .layer_stats import KeyStats, load_or_measure

logger = logging.getLogger(__name__)


@dataclass
class LocateConfig(EditConfig):
    """The settings ROME, MEMIT and AlphaEdit share: how v* is found (the reference's
    ``v_*`` hyper-parameters), the context prefixes, and the key statistics. Defaults
    are ROME's (hparams/ROME/gpt2-xl.json and EleutherAI_gpt-j-6B.json)."""

    # the decoder layer edited by default, relative to the model's depth; None: WISE's
    relative_depth: ClassVar[float] = 5 / 32

    lr: float = field(default=0.5, metadata={"help": "Adam step size of v* (v_lr)."})
    max_steps: int = field(default=20, metadata={"help": "Steps of v* at most (v_num_grad_steps)."})
    early_stop_loss: float = field(
        default=5e-2, metadata={"help": "Stop v* once the loss is below this (compute_v.py)."}
    )
    kl_factor: float = field(
        default=0.0625,
        metadata={"help": "Weight of the KL term on '{subject} is a' (kl_factor)."},
    )
    value_decay: float = field(
        default=0.5,
        metadata={"help": "Weight of the penalty ||δ|| / ||v_0||^2 on v* (v_weight_decay)."},
    )
    clamp_norm_factor: float = field(
        default=4.0, metadata={"help": "||δ|| is kept within this times ||v_0||."}
    )
    context_count: int = field(
        default=20,
        metadata={
            "help": "Context prefixes the prompt is also written behind, generated once by "
            "the unedited model (ROME: 10 of 5 and 10 of 10 tokens)."
        },
    )
    context_lengths: tuple[int, ...] = field(
        default=(5, 10), metadata={"help": "Token lengths the prefixes cycle through."}
    )
    stats_corpus: str | None = field(
        default=None,
        metadata={
            "help": "Text C = E[k k^T] is measured on: a data folder (its Hallucination "
            "passages and locality texts), a text file (one text per line) or 'neutral' "
            "(built-in sentences, for tiny test models). None: the benchmark data folder."
        },
    )
    stats_tokens: int = field(
        default=100_000, metadata={"help": "Tokens of the corpus C is measured on, at most."}
    )
    stats_dir: str | None = field(
        default=None,
        metadata={"help": "Cache folder of C. None: key-stats/ in the wise-edit cache folder."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._validate(
            [
                ("kl_factor", self.kl_factor >= 0, "must be >= 0"),
                ("value_decay", self.value_decay >= 0, "must be >= 0"),
                ("clamp_norm_factor", self.clamp_norm_factor > 0, "must be > 0"),
                ("context_count", self.context_count >= 0, "must be >= 0"),
                ("context_lengths", all(n >= 1 for n in self.context_lengths), "must be >= 1"),
                ("context_lengths", bool(self.context_lengths), "must not be empty"),
                ("stats_tokens", self.stats_tokens >= 1, "must be >= 1"),
            ]
        )

    def resolve_layer(self, model: nn.Module) -> int:
        """The edited (for MEMIT: the last edited) layer; None: the method's depth."""
        if self.layer is None and self.target_module is None:
            count = len(decoder_layers(model, self.resolve_layers_path(model)))
            return min(count - 1, int(count * self.relative_depth))
        return super().resolve_layer(model)

    def edited_layers(self, last: int) -> list[int]:
        """Indices of every edited layer, given the last one's."""
        return [last]


@dataclass
class Plan:
    """One edit's inputs to the value optimisation and the keys: its rows and their
    frozen lower part, the subject's last token in each row, and the essence row."""

    request: EditRequest
    rows: EditRows
    lower: Captured
    positions: torch.Tensor  # (R,) the lookup token of each row
    essence: (
        tuple[torch.Tensor, torch.Tensor, Captured, torch.Tensor] | None
    )  # ids, mask, lower, pos


@contextmanager
def add_at(module: nn.Module, positions: torch.Tensor, delta: torch.Tensor) -> Iterator[dict]:
    """``module``'s output gets ``delta`` (H,) added at row i's token ``positions[i]``, in
    this thread only; the yielded dict receives ``module``'s original output there
    (``"before"``, (R, H)) at each forward."""
    import threading

    owner, seen = threading.get_ident(), {}

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        states = hidden_of(output)
        rows = torch.arange(states.shape[0], device=states.device)
        seen["before"] = states[rows, positions].detach()
        bump = torch.zeros_like(states)
        bump[rows, positions] = delta.to(states.dtype)
        states = states + bump
        return (states, *output[1:]) if isinstance(output, tuple) else states

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class LocateEditor(EditorBase):
    """Closed-form locate-then-edit of one or more FFN value matrices. Subclasses set
    where v* is read (`_value_site`) and how the update is solved (`_solve`)."""

    config_class: ClassVar[type[LocateConfig]] = LocateConfig
    layer_class = DeltaLayer
    routes = False
    retractable = False
    route_unit = "edited weights"
    layer: DeltaLayer
    config: LocateConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edited = self.config.edited_layers(self.layer_index)
        self.deltas: dict[int, DeltaLayer] = {self.layer_index: self.layer}
        self._paths: dict[int, str] = {self.layer_index: self.target_path}
        try:
            for index in self.edited:
                if index != self.layer_index:
                    self._attach(index)
        except Exception:
            self.detach()
            raise
        self.prefixes: list[str] | None = None  # generated at the first edit
        self._stats: dict[int, KeyStats] = {}

    def _attach(self, index: int) -> None:
        # the primary target's path with another layer index: also for a given target_module
        layers_path = self.config.resolve_layers_path(self.model)
        inside = self.target_path[len(layers_path) + 1 :].split(".", 1)[1]
        path = f"{layers_path}.{index}.{inside}"
        module = get_submodule(self.model, path)
        if isinstance(module, AttachedLayer):
            raise ValueError(f"{path} already has an editor attached")
        check_value_module(module, path)
        self.deltas[index] = DeltaLayer(module)
        self._paths[index] = path
        set_submodule(self.model, path, self.deltas[index])

    def detach(self) -> nn.Module:
        """Put every original module back: the model is exactly the unedited one again."""
        for index, layer in getattr(self, "deltas", {}).items():
            if index != self.layer_index and self._attached:
                set_submodule(self.model, self._paths[index], layer.base_layer)
        return super().detach()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with ExitStack() as stack:
            for layer in self.deltas.values():
                stack.enter_context(layer.disabled())
            yield

    @contextmanager
    def _trials(self, deltas: Mapping[int, torch.Tensor]) -> Iterator[None]:
        """Every edited layer computes with ``deltas`` (this thread only)."""
        with ExitStack() as stack:
            for index, delta in deltas.items():
                stack.enter_context(self.deltas[index].trial(delta))
            yield

    @property
    def edit_batch(self) -> int | None:
        return getattr(self.config, "batch_size", 1)

    # ------------------------------------------------------------------ editing
    def edit(
        self,
        prompt: str,
        target: str,
        meta: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
    ) -> EditResult:
        """One edit: a batch of one (see the module's docstring)."""
        return self._edit_batch([(prompt, target, subject)], [meta])[0]

    def _check_batch(self) -> None:
        if not hasattr(self.config, "batch_size"):
            super()._check_batch()

    def _edit_together(
        self, requests: list[EditRequest], metas: list[dict[str, Any] | None]
    ) -> list[EditResult]:
        """A group of edits is one update: the method's own batch solve."""
        return self._edit_batch([(r.prompt, r.target, r.subject) for r in requests], metas)

    def _edit_batch(
        self, items: Sequence[tuple[str, str, str | None]], metas: Sequence[Any]
    ) -> list[EditResult]:
        self._check_attached()
        metas = [None if m is None else json.loads(json.dumps(dict(m))) for m in metas]
        requests = [EditRequest(p, t, _checked_subject(p, s)) for p, t, s in items]
        started = time.perf_counter()
        with editing_mode(self.model):
            plans = [self._plan(r) for r in requests]
            fitted = [self._fit_value(plan) for plan in plans]
            values = torch.stack([v for _, v in fitted], dim=1)  # (H, n)
            update = self._solve(plans, values)
        seconds = (time.perf_counter() - started) / len(requests)
        results = [
            EditResult(
                index=len(self.edit_log) + i,
                prompt=r.prompt,
                target=r.target,
                steps=f.steps,
                loss=f.loss,
                lm_loss=f.lm_loss,
                seconds=seconds,
                answered_at=f.answered_at,
            )
            for i, (r, (f, _)) in enumerate(zip(requests, fitted))
        ]
        with self.state_lock.write():
            self._commit_update(update)
            for result, request, meta in zip(results, requests, metas):
                entry: dict[str, Any] = {**asdict(result), "batch": len(requests)}
                if request.subject is not None:
                    entry["subject"] = request.subject
                self.edit_log.append(entry if meta is None else {**entry, "meta": meta})
        logger.info("%s: %d edit(s), %.2f s each", self.method, len(results), seconds)
        return results

    def _plan(self, request: EditRequest) -> Plan:
        rows = self._edit_rows(request.prompt, request.target)
        lower = self._capture(rows, keep_lower_output=self.config.fast_path)
        positions = self._lookup(rows, request.subject)
        essence = None
        if request.subject is not None and self.config.kl_factor > 0:
            ids = self.tokenizer(f"{request.subject} is a")["input_ids"]
            at = subject_end(self.tokenizer, ids, request.subject)
            ids_t, mask = left_pad([ids], pad_id(self.tokenizer))
            ids_t, mask = ids_t.to(self.device), mask.to(self.device)
            pos = torch.tensor([len(ids) - 1 if at is None else at], device=self.device)
            captured = self._capture_ids(ids_t, mask, self.config.fast_path)
            essence = (ids_t, mask, captured, pos)
        return Plan(request, rows, lower, positions, essence)

    def _lookup(self, rows: EditRows, subject: str | None) -> torch.Tensor:
        """Each row's lookup token: the subject's last token in the prompt part (the
        reference's ``subject_last``), or the prompt's last token where the edit names no
        subject (its ``last``)."""
        width, n = rows.input_ids.shape[1], rows.targets.shape[1]
        out = []
        for ids, mask in zip(rows.input_ids.tolist(), rows.attention_mask.tolist()):
            start = width - sum(mask)
            at = (
                None
                if subject is None
                else subject_end(self.tokenizer, ids[start : width - n], subject)
            )
            out.append(width - n - 1 if at is None else start + at)
        return torch.tensor(out, device=self.device)

    def _row_prefixes(self) -> list[str]:
        if self.prefixes is None:
            cfg = self.config
            with self.disabled():
                self.prefixes = generate_prefixes(
                    self.model.generate,
                    self.tokenizer,
                    self.device,
                    cfg.context_count,
                    cfg.context_lengths,
                    cfg.seed,
                )
        return self.prefixes

    # ------------------------------------------------------------------ v*
    def _value_site(self) -> nn.Module:
        """The module whose output v* replaces at the lookup token."""
        raise NotImplementedError

    def _fit_value(self, plan: Plan) -> tuple[Fitted, torch.Tensor]:
        """v* = v_0 + δ for one edit, δ found as in `rome/compute_v.py`: target NLL over
        every row, KL of the essence row's next-token distribution from the unedited one,
        and ||δ|| / ||v_0||^2, by Adam; ||δ|| clamped to clamp_norm_factor * ||v_0||."""
        cfg, site = self.config, self._value_site()
        # the value matrix's output is the residual stream's width
        delta = torch.zeros(self.layer.weight.shape[0], device=self.device, requires_grad=True)
        init: dict[str, torch.Tensor] = {}

        def loss_fn() -> StepLoss:
            with add_at(site, plan.positions, delta) as seen:
                lm, answered = self._target_fit(plan.rows, plan.lower)
            init.setdefault("v0", seen["before"][0].float())
            v0 = init["v0"]
            loss = lm + cfg.value_decay * delta.norm() / v0.norm().pow(2)
            if plan.essence is not None:
                log_probs = self._essence_log_probs(site, plan.essence, delta)
                kl_init = init.setdefault("kl", log_probs.detach())
                kl = nn.functional.kl_div(
                    kl_init, log_probs, log_target=True, reduction="batchmean"
                )
                loss = loss + cfg.kl_factor * kl
            return StepLoss(loss, lm, answered)

        def clamp() -> None:
            bound = cfg.clamp_norm_factor * init["v0"].norm()
            if delta.norm() > bound:
                delta.mul_(bound / delta.norm())

        fitted = fit(
            loss_fn,
            adam_update([delta], cfg.lr, clamp),
            max_steps=cfg.max_steps,
            early_stop_loss=cfg.early_stop_loss,
            patience=cfg.early_stop_patience,
            stop_on=cfg.early_stop_on,
        )
        return fitted, (init["v0"] + delta.detach()).double()

    def _essence_log_probs(
        self, site: nn.Module, essence: tuple[Any, ...], delta: torch.Tensor
    ) -> torch.Tensor:
        """Next-token log-probabilities (1, V) at the subject's last token of
        "{subject} is a", with δ added there too."""
        ids, mask, lower, pos = essence
        with add_at(site, pos, delta):
            if self.config.fast_path:
                with fastpath.replay_lower_layers(
                    self.layers, self.layer_index, lower.lower_output
                ):
                    out = self.model.base_model(**fastpath.backbone_inputs(ids, mask))
            else:
                out = self.model.base_model(**fastpath.backbone_inputs(ids, mask))
        hidden = out.last_hidden_state[torch.arange(len(pos)), pos]  # (1, H)
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits.float(), dim=-1)

    # ------------------------------------------------------------------ keys and update
    def _solve(self, plans: Sequence[Plan], values: torch.Tensor) -> dict[str, Any]:
        """The new state (``"deltas"``: every edited layer's new delta, and what the
        method keeps beside) from the edits' plans and v* (H, n)."""
        raise NotImplementedError

    def _commit_update(self, update: Mapping[str, Any]) -> None:
        for index, delta in update["deltas"].items():
            self.deltas[index].delta.copy_(delta)

    def _keys(self, plans: Sequence[Plan], index: int, grouped: bool) -> torch.Tensor:
        """The edits' keys (I, n) at layer ``index``'s value matrix, as the model computes
        now (trial deltas included): each the mean over its rows at the lookup token;
        ``grouped``: the mean of the raw prompt's and of the prefixed rows' means
        (MEMIT's `compute_ks`), else of all rows (ROME's `compute_u`)."""
        keys = []
        for plan in plans:
            at = self._row_keys(plan, index)  # (R, I)
            if grouped and len(at) > 1:
                keys.append((at[0] + at[1:].mean(0)) / 2)
            else:
                keys.append(at.mean(0))
        return torch.stack(keys, dim=1)

    def _row_keys(self, plan: Plan, index: int) -> torch.Tensor:
        """Layer ``index``'s value-matrix input at the lookup token of each of the edit's
        rows (R, I), fp64, as the model computes now; row 0 is the raw prompt."""
        acts = fastpath.capture(
            self.model.base_model,
            self.layers,
            index,
            self.deltas[index],
            plan.rows.input_ids,
            plan.rows.attention_mask,
            keep_lower_output=False,
        ).acts  # (R, T, I)
        return acts[torch.arange(len(acts)), plan.positions].double()

    def key_stats(self, index: int) -> KeyStats:
        """C of layer ``index``'s value matrix on the unedited model (cached on disk and,
        for this editor's life, in memory)."""
        if index not in self._stats:
            from ..data import default_data_dir

            cfg = self.config
            corpus = cfg.stats_corpus if cfg.stats_corpus is not None else str(default_data_dir())
            wanted = {index} | set(self.deltas)  # every edited layer's, in one pass
            modules = {self._paths[i]: self.deltas[i] for i in wanted if i not in self._stats}
            with self.disabled(), editing_mode(self.model):
                stats = load_or_measure(
                    self.model,
                    self.tokenizer,
                    modules,
                    corpus,
                    cfg.stats_tokens,
                    cache_dir=cfg.stats_dir,
                )
            paths = {path: i for i, path in self._paths.items()}
            self._stats.update({paths[path]: s for path, s in stats.items()})
        return self._stats[index]

    @torch.no_grad()
    def _outputs(self, index: int, keys: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s value matrix as committed, applied to ``keys`` (I, n) in fp64:
        (W + delta) K + b, (O, n)."""
        layer = self.deltas[index]
        weight = layer.weight.double() + layer.delta.double()
        out = weight @ keys.double()
        bias = getattr(layer.base_layer, "bias", None)
        return out if bias is None else out + bias.double()[:, None]

    def summary(self) -> dict[str, Any]:
        changes = [d.delta.abs() for d in self.deltas.values()]
        return {
            "max_abs_change": max(float(c.max()) for c in changes),
            "mean_abs_change": sum(float(c.mean()) for c in changes) / len(changes),
            **super().summary(),
        }

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        return {
            "layers": list(self.edited),
            "prefixes": self.prefixes,
            "fingerprints": [
                weight_fingerprint(self.deltas[i].base_layer, self._paths[i], self.model)
                for i in self.edited
            ],
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"delta.{i}": self.deltas[i].delta for i in self.edited}

    @classmethod
    def _check_saved(
        cls, check: SaveChecker, state: dict[str, Any], config: Any, weight: torch.Tensor
    ) -> None:
        layers = check.field(state, "layers", list)
        if not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            check.fail("editor_state.json", "layers", "must be a non-empty list of layer indices")
        check.strings(state, "prefixes", optional=True)
        check.field(state, "fingerprints", list)
        for index in layers:
            check.tensor(f"delta.{index}", weight.shape)

    @classmethod
    def _from_saved(
        cls, model: nn.Module, tokenizer: Any, config: Any, irrelevant_prompts: Any, saved: Saved
    ) -> Any:
        editor = cls(model, tokenizer, config, irrelevant_prompts)
        try:
            if saved.state["layers"] != editor.edited:
                raise ValueError(
                    f"the save edits layers {saved.state['layers']}, its config here "
                    f"{editor.edited}"
                )
            current = editor._state()["fingerprints"]
            for here, there in zip(current, saved.state["fingerprints"], strict=True):
                check_fingerprint(here, there, "the save")
        except Exception:
            editor.detach()
            raise
        editor.edit_log = saved.state["edit_log"]
        editor._restore(saved.state, saved.tensors)
        return editor

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.prefixes = state.get("prefixes")
        for index in self.edited:
            self.deltas[index].delta.copy_(tensors[f"delta.{index}"])
