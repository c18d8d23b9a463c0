"""What every editor shares, WISE and the baselines alike: putting a wrapper in place of
one module of the model (and taking it out again), serving (`generate`, forward), the
stream of edits, the optimisation loop, and the result record of an edit.

A method only says how its wrapper computes, what one edit trains, and what it commits.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .families import check_value_module, decoder_layers, get_submodule, weight_out_in
from .fastpath import Captured, capture, fast_lm_loss, full_lm_loss
from .neutral import NEUTRAL_PROMPTS
from .rows import EditRows, build_rows, context_limit, encode_prompts, pad_id


@dataclass
class EditResult:
    """What one edit did. ``memory``: the WISE side memory or GRACE codebook entry it went
    to, ``shard``: WISE's shard; -1 where the method has no such thing."""

    index: int
    prompt: str
    target: str
    steps: int
    loss: float
    lm_loss: float
    seconds: float
    memory: int = -1
    shard: int = -1


# ---------------------------------------------------------------------- the wrapped layer
class RoutingState:
    """The decision of the sequences currently being processed, for methods that decide
    per sequence.

    A new sequence (no KV cache yet) is decided from its prompt once; every later forward
    over the same cache (generation steps) reuses that decision instead of re-deciding
    from a single new token. ``token_mask`` is the prompt's attention mask.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.choice: torch.Tensor | None = None
        self.pending = True

    def begin(self, token_mask: torch.Tensor | None) -> None:
        self.token_mask, self.choice, self.pending = token_mask, None, True

    def hold(self) -> None:
        self.pending = False

    def decide(self, batch: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The held decision (one entry per row), made by ``make`` for a new sequence."""
        if self.pending or self.choice is None:
            self.choice = make()
            self.pending = False
        if self.choice.shape[0] != batch:
            raise RuntimeError(
                f"the decision was made for a batch of {self.choice.shape[0]} sequences but "
                f"the layer now sees {batch}; start a new forward without a KV cache"
            )
        return self.choice

    def mask_for(self, x: torch.Tensor) -> torch.Tensor:
        """The token mask of ``x`` (B, T, ...): the prompt's, or all ones when the layer
        sees something else (a decoding step, a call without a mask)."""
        mask = self.token_mask
        if mask is None or mask.shape != x.shape[:2]:
            return torch.ones(x.shape[:2], device=x.device)
        return mask.to(x.device)


def last_positions(token_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding)."""
    width = token_mask.shape[1]
    return width - 1 - token_mask.flip(-1).float().argmax(-1)


def last_token(acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Each row's activation (B, I) at its last real token."""
    rows = torch.arange(acts.shape[0], device=acts.device)
    return acts[rows, last_positions(token_mask).to(acts.device)]


class AttachedLayer(nn.Module):
    """Base of every module wise-edit puts in place of a model's linear layer: it keeps
    the original as ``base_layer`` (bias and GPT-2 Conv1D layout included) and can be
    switched off (``disabled``) to behave exactly as the unedited model."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = RoutingState()
        self._disabled = False
        self._trial: Any = None

    @contextmanager
    def trial(self, state: Any) -> Iterator[None]:
        """Compute with ``state`` (what an edit is training, in the form the layer's
        forward reads) instead of what is committed: the editing forward."""
        previous, self._trial = self._trial, state
        try:
            yield
        finally:
            self._trial = previous

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped matrix in (out, in) layout."""
        return weight_out_in(self.base_layer)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Behave as the unedited layer (pre-edit scores, prefix generation)."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous


# ---------------------------------------------------------------------- the editor
class EditorBase:
    """Attaches a method's `AttachedLayer` to one linear module of a causal LM.

    Subclasses set ``method``, ``config_class``, ``layer_class`` and ``save_files``, and
    implement `edit`, `_state`/`_tensors`/`_restore` (persistence) and optionally
    `routed` and `summary`. The model is modified in place until `detach()`.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type]
    layer_class: ClassVar[type[AttachedLayer]]
    save_files: ClassVar[tuple[str, str, str]]  # config JSON, state JSON, tensors

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
        self.layers, self.layer_index = self._locate_layer(model)
        module = get_submodule(model, self.target_path)
        if isinstance(module, AttachedLayer):
            raise ValueError(f"{self.target_path} already has an editor attached")
        check_value_module(module, self.target_path)
        self.irrelevant_prompts = list(irrelevant_prompts or NEUTRAL_PROMPTS)
        if not self.irrelevant_prompts or not all(
            isinstance(p, str) and p.strip() for p in self.irrelevant_prompts
        ):
            raise ValueError("irrelevant_prompts must be non-empty strings")
        self.fingerprint = weight_fingerprint(module, self.target_path, model)
        self.edit_log: list[dict[str, Any]] = []
        self.layer = self._make_layer(module)
        _set_submodule(model, self.target_path, self.layer)
        self._hook = model.base_model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._attached = True

    def _make_layer(self, module: nn.Module) -> AttachedLayer:
        return self.layer_class(module)

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
            raise RuntimeError(
                f"this {type(self).__name__} was detached; attach a new one to edit again"
            )

    def _on_forward(self, _module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        """Every forward of the backbone: a new sequence starts a decision, a forward that
        continues a KV cache keeps the one made at prefill."""
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

    def __call__(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def generate(self, **inputs: Any) -> torch.Tensor:
        """`model.generate`; a per-sequence decision is held from the prompt for every
        new token."""
        inputs.setdefault("pad_token_id", pad_id(self.tokenizer))
        return self.model.generate(**inputs)

    def routed(self, prompts: list[str]) -> list[bool] | None:
        """Whether each prompt would reach the edits' memory; None for methods that
        edit the model itself and so reach every input."""
        return None

    def summary(self) -> dict[str, Any]:
        """A few numbers about the editor's state, for benchmark reports."""
        steps = [e["steps"] for e in self.edit_log]
        return {"steps_per_edit": round(sum(steps) / max(1, len(steps)), 1)}

    # ------------------------------------------------------------------ editing
    def edit(self, prompt: str, target: str) -> EditResult:
        raise NotImplementedError

    def edit_many(
        self, records: Iterable[Mapping[str, str] | tuple[str, str]], progress: bool = False
    ) -> list[EditResult]:
        """Edit a stream, one sequential edit at a time, continuing the same state."""
        records = list(records)
        results: list[EditResult] = []
        bar = tqdm(records, desc=f"{self.method or 'editing'}", unit="edit", disable=not progress)
        for record in bar:
            prompt, target = _prompt_target(record)
            results.append(self.edit(prompt, target))
            bar.set_postfix(s_per_edit=f"{results[-1].seconds:.2f}", steps=results[-1].steps)
        return results

    def _edit_rows(self, prompt: str, target: str, prefixes: Sequence[str] = ()) -> EditRows:
        """Validated training rows of one edit, on the editor's device."""
        self._check_attached()
        if not isinstance(prompt, str) or not isinstance(target, str):
            raise TypeError("prompt and target must be strings")
        rows = build_rows(self.tokenizer, prompt, target, list(prefixes))
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

    def _lm_loss(self, rows: EditRows, lower: Captured, fast_path: bool = True) -> torch.Tensor:
        """Target NLL of the rows with the wrapped layer as it currently computes."""
        if fast_path:
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

    @torch.no_grad()
    def _prompt_batch_acts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of the wrapped module (B, T, I) and token mask (B, T) of a left-padded
        prompt batch."""
        ids, mask = encode_prompts(self.tokenizer, prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with editing_mode(self.model):
            acts = self._capture_ids(ids, mask, keep_lower_output=False).acts
        return acts, mask

    def _irrelevant_sample(self, count: int, seed: int) -> list[str]:
        """Unrelated prompts for this edit, drawn from the pool by a generator seeded from
        the edit index (reproducible, and the same after save/load)."""
        gen = torch.Generator().manual_seed(seed * 7919 + len(self.edit_log))
        count = min(count, len(self.irrelevant_prompts))
        picks = torch.randperm(len(self.irrelevant_prompts), generator=gen)[:count].tolist()
        return [self.irrelevant_prompts[i] for i in picks]

    def _log(self, result: EditResult) -> None:
        self.edit_log.append(asdict(result))

    def _result(
        self, prompt: str, target: str, fitted: Fitted, started: float, **where: int
    ) -> EditResult:
        return EditResult(
            index=len(self.edit_log),
            prompt=prompt,
            target=target,
            steps=fitted.steps,
            loss=fitted.loss,
            lm_loss=fitted.lm_loss,
            seconds=time.perf_counter() - started,
            **where,
        )

    # ------------------------------------------------------------------ persistence
    def _state(self) -> dict[str, Any]:
        """Everything but tensors that `load` needs (JSON)."""
        raise NotImplementedError

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _restore(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Write config, state and tensors (safetensors + JSON, no pickle)."""
        from .persistence import save_editor

        save_editor(self, path)

    @classmethod
    def load(
        cls,
        model: nn.Module,
        tokenizer: Any,
        path: str,
        irrelevant_prompts: Sequence[str] | None = None,
    ) -> Any:
        """Re-attach saved edits to ``model``; refuses a folder made for another model,
        layer or method."""
        from .persistence import load_editor

        return load_editor(cls, model, tokenizer, path, irrelevant_prompts)


# ---------------------------------------------------------------------- the loop
@dataclass
class Fitted:
    """How an edit's optimisation ended."""

    steps: int
    loss: float
    lm_loss: float


def fit(
    loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    update: Callable[[torch.Tensor], None],
    *,
    max_steps: int,
    early_stop_loss: float,
    patience: int = 1,
    stop_on_lm: bool = False,
) -> Fitted:
    """The optimisation loop of every method: ``loss_fn`` gives (loss, LM part),
    ``update`` turns the loss into one parameter step.

    Stops after ``patience`` consecutive steps below ``early_stop_loss`` (of the LM part
    with ``stop_on_lm``, else of the whole loss), or after ``max_steps`` forwards. A
    non-finite loss raises before anything is committed.
    """
    below, n = 0, 0
    loss_value = lm_value = float("nan")
    for n in range(1, max_steps + 1):
        loss, lm = loss_fn()
        loss_value, lm_value = loss.item(), lm.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"edit loss became {loss_value} at step {n}; the edit was not applied "
                "(try a smaller lr)"
            )
        below = below + 1 if (lm_value if stop_on_lm else loss_value) < early_stop_loss else 0
        if below >= patience:
            break
        update(loss)
    return Fitted(n, loss_value, lm_value)


def adam_update(
    params: list[torch.Tensor], lr: float, after: Callable[[], None] | None = None
) -> Callable[[torch.Tensor], None]:
    """An `update` for `fit`: one Adam step on ``params``, then ``after`` (a projection)."""
    optimizer = torch.optim.Adam(params, lr=lr)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after is not None:
            with torch.no_grad():
                after()

    return update


# ---------------------------------------------------------------------- helpers
def weight_fingerprint(module: nn.Module, path: str, model: nn.Module) -> dict[str, Any]:
    """Identifies the weight the edits were made against."""
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
def editing_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and frozen model parameters while an edit trains, restored
    afterwards: gradients flow only into the tensors the method trains."""
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
