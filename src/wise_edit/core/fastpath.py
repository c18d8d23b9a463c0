"""The editing forward, made cheap.

Only the side memory changes while an edit trains, so everything below the edited layer
(and, inside it, the value matrix's input) is identical at every step. `capture` runs the
frozen part once; `replay_lower_layers` makes the lower decoder layers hand back that
result instead of recomputing it; `target_logits` applies the LM head only where a target
token is predicted.

The hooks and replaced forwards act only in the thread that installed them: other
threads (requests served while an edit trains) run the model as usual.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by a hook once the activations we need exist; nothing above is computed."""


@dataclass
class Captured:
    """What the frozen part of the model produced for a batch."""

    acts: torch.Tensor  # (B, T, I) input of the value matrix
    lower_output: Any  # output of the last layer below the edited one (None when layer 0)

    def take(self, index: list[int], start: int) -> Captured:
        """What the rows ``index`` from column ``start`` on captured (`EditRows.take`)."""
        batch, width = self.acts.shape[:2]

        def part(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == (batch, width):
                return x[index, start:]
            if isinstance(x, tuple):
                return tuple(part(y) for y in x)
            return x

        return Captured(part(self.acts), part(self.lower_output))

    @classmethod
    def join(cls, parts: Sequence[Captured]) -> Captured:
        """What `EditRows.join` of the parts' rows would capture: each part's per-token
        tensors left-padded with zeros (padding is masked, so never read) and stacked."""
        width = max(p.acts.shape[1] for p in parts)

        def joined(xs: list[Any], p: list[Captured]) -> Any:
            first = xs[0]
            if isinstance(first, tuple):
                return tuple(joined([x[i] for x in xs], p) for i in range(len(first)))
            per_token = [
                isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[:2] == q.acts.shape[:2]
                for x, q in zip(xs, p)
            ]
            if not all(per_token):
                return first
            pads = [(0, 0) * (x.dim() - 2) + (width - x.shape[1], 0) for x in xs]
            return torch.cat([nn.functional.pad(x, pad) for x, pad in zip(xs, pads)])

        parts = list(parts)
        return cls(
            joined([p.acts for p in parts], parts), joined([p.lower_output for p in parts], parts)
        )


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_for(attention_mask),
        "use_cache": False,
    }


@torch.no_grad()
def capture(
    backbone: nn.Module,
    layers: nn.ModuleList,
    layer_index: int,
    value_module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    keep_lower_output: bool = True,
) -> Captured:
    """Run the model up to the value matrix of ``layer_index`` and stop there."""
    found: dict[str, Any] = {}
    handles = _capture_hooks(layers, layer_index, value_module, found, keep_lower_output)
    _run_until_stopped(backbone, input_ids, attention_mask, handles)
    if "acts" not in found:
        raise RuntimeError("the value module was never called; is the target module right?")
    return Captured(acts=found["acts"], lower_output=found.get("lower"))


@dataclass
class Head:
    """The frozen part of the forward for a token prefix that rows start with (a chat
    template's header): the keys and values its tokens leave in the decoder layers up to
    the edited one, and its captured `acts` (P, I) and `lower` output (P, H)."""

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer 0..layer_index: (1, h, P, d)
    acts: torch.Tensor
    lower: torch.Tensor | None


def shared_head(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[int, ...]:
    """The longest token prefix every row of a left-padded batch starts with."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    head: list[int] = []
    for column in zip(*rows):
        if any(token != column[0] for token in column):
            break
        head.append(column[0])
    return tuple(head)


@torch.no_grad()
def capture_head(
    backbone: nn.Module,
    layers: nn.ModuleList,
    layer_index: int,
    value_module: nn.Module,
    ids: tuple[int, ...],
) -> Head:
    """`Head` of the token prefix ``ids``, from one forward of it alone (positions from 0,
    as in every row: left padding does not move them)."""
    device = next(backbone.parameters()).device
    tokens = torch.tensor([ids], device=device)
    cache = _new_cache(backbone)
    found: dict[str, Any] = {}
    handles = _capture_hooks(layers, layer_index, value_module, found, keep_lower_output=True)
    positions = torch.arange(len(ids), device=device)[None]
    _run_cached(backbone, handles, tokens, torch.ones_like(tokens), positions, cache)
    kv = [_layer_kv(cache, i) for i in range(layer_index + 1)]
    lower = found.get("lower")
    lower = hidden_of(lower)[0] if lower is not None else None
    return Head(ids, kv, found["acts"][0], lower)


@torch.no_grad()
def capture_after_head(
    backbone: nn.Module,
    layers: nn.ModuleList,
    layer_index: int,
    value_module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    head: Head,
    keep_lower_output: bool = True,
) -> Captured:
    """`capture` of rows that all start with ``head``: only the tokens after it are run,
    attending to its cached keys and values; its own part is copied in. Returns what
    `capture` returns for the same batch (pad positions zero)."""
    batch, width = input_ids.shape
    size = len(head.ids)
    lengths = attention_mask.sum(1)
    tail_width = width - size
    # each row's tokens after the head are its last ones: the same columns, left-padded
    # anew (what the mask hides there, padding or the head's tokens, is never read)
    tail_ids = input_ids[:, size:]
    kept = torch.arange(tail_width, device=input_ids.device)[None] >= (width - lengths)[:, None]
    tail_mask = kept.to(attention_mask.dtype)
    mask = torch.cat([tail_mask.new_ones(batch, size), tail_mask], dim=1)
    positions = position_ids_for(mask)[:, size:]
    cache = _new_cache(backbone)
    for i, (k, v) in enumerate(head.kv):
        cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
    found: dict[str, Any] = {}
    handles = _capture_hooks(layers, layer_index, value_module, found, keep_lower_output)
    _run_cached(backbone, handles, tail_ids, mask, positions, cache)
    if "acts" not in found:
        raise RuntimeError("the value module was never called; is the target module right?")
    lower = found.get("lower")
    lower = hidden_of(lower)
    acts = with_head(found["acts"], head.acts, lengths, size, width)
    if keep_lower_output and lower is not None and head.lower is not None:
        return Captured(acts, with_head(lower, head.lower, lengths, size, width))
    return Captured(acts, None)


def with_head(
    tail: torch.Tensor, head: torch.Tensor, lengths: torch.Tensor, size: int, width: int
) -> torch.Tensor:
    """Rows laid out as the original batch (`capture_after_head`): padding (zeros),
    ``head`` (P, D), then each row's tokens after it, the last ones of ``tail``
    (B, W - P, D); ``lengths`` (B,) counts each row's tokens, head included."""
    out = tail.new_zeros(len(tail), width, tail.shape[-1])
    for row, length in enumerate(lengths.tolist()):
        start, n = width - length, length - size
        out[row, start : start + size] = head
        if n:
            out[row, width - n :] = tail[row, tail.shape[1] - n :]
    return out


def _capture_hooks(
    layers: nn.ModuleList,
    layer_index: int,
    value_module: nn.Module,
    found: dict[str, Any],
    keep_lower_output: bool,
) -> list[torch.utils.hooks.RemovableHandle]:
    def grab_lower(_module: nn.Module, _args: Any, output: Any) -> None:
        found["lower"] = output

    def grab_acts(_module: nn.Module, args: tuple[Any, ...]) -> None:
        found["acts"] = args[0].detach()
        raise _StopForward

    handles = [value_module.register_forward_pre_hook(_this_thread(grab_acts))]
    if keep_lower_output and layer_index > 0:
        handles.append(layers[layer_index - 1].register_forward_hook(_this_thread(grab_lower)))
    return handles


def _run_cached(
    backbone: nn.Module,
    handles: list[torch.utils.hooks.RemovableHandle],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
) -> None:
    """`_run_until_stopped` with explicit positions, continuing (and filling) ``cache``."""
    try:
        backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{_cache_argument(backbone): cache},
        )
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _cache_argument(backbone: nn.Module) -> str:
    """The backbone's name for a key-value cache (``cache`` from transformers 5.x on)."""
    return _cache_argument_of(type(backbone))


@functools.cache
def _cache_argument_of(cls: type) -> str:  # read once per model class
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hidden_of(output: Any) -> Any:
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple
    (the form changed between transformers versions)."""
    return output[0] if isinstance(output, tuple) else output


def _new_cache(backbone: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=backbone.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _layer_kv(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        layer = cache.layers[index]
        return layer.keys, layer.values
    return cache.key_cache[index], cache.value_cache[index]


@torch.no_grad()
def layer_output(
    backbone: nn.Module,
    layers: nn.ModuleList,
    depth: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """The residual stream (B, T, H) after the first ``depth`` decoder layers, and nothing
    above them computed: a key read low in the model costs a few layers, not the forward."""
    if not 1 <= depth <= len(layers):
        raise ValueError(f"depth {depth}: the model has {len(layers)} decoder layers")
    found: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, _args: Any, output: Any) -> None:
        found["states"] = hidden_of(output)
        raise _StopForward

    handle = layers[depth - 1].register_forward_hook(_this_thread(grab))
    _run_until_stopped(backbone, input_ids, attention_mask, [handle])
    return found["states"]


def _run_until_stopped(
    backbone: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    handles: list[torch.utils.hooks.RemovableHandle],
) -> None:
    """Run the backbone until one of its hooks raises `_StopForward` (or to the end),
    then remove the hooks, whatever happened."""
    try:
        backbone(**backbone_inputs(input_ids, attention_mask))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _this_thread(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` for calls from the current thread; a no-op in every other thread."""
    owner = threading.get_ident()

    def guarded(*args: Any) -> Any:
        return hook(*args) if threading.get_ident() == owner else None

    return guarded


@contextmanager
def replay_lower_layers(layers: nn.ModuleList, layer_index: int, output: Any) -> Iterator[None]:
    """Layers below ``layer_index`` return ``output`` (the last one's real output) at once.

    The model's own loop still runs (embeddings, masks, rotary tables: cheap), so this works
    for every family without re-implementing any of their forwards.
    """
    owner = threading.get_ident()

    def replaced(real: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return output if threading.get_ident() == owner else real(*args, **kwargs)

        return forward

    with ExitStack() as stack:
        for layer in layers[:layer_index]:
            layer.forward = replaced(layer.forward)
            stack.callback(delattr, layer, "forward")
        yield


def target_logits(model: nn.Module, hidden: torch.Tensor, n_targets: int) -> torch.Tensor:
    """LM-head logits at the positions that predict the last ``n_targets`` tokens.

    Rows are left-padded, so those positions are the same tail slice for every row.
    """
    picked = hidden[:, -n_targets - 1 : -1]  # (B, n, H), a strided view
    # flattened to 2-D: a strided 3-D input makes matmul broadcast the LM head into a
    # batched product, copying the (V, H) weight once per row
    flat = picked.reshape(-1, picked.shape[-1])  # (B*n, H)
    logits = model.get_output_embeddings()(flat).view(*picked.shape[:2], -1)  # (B, n, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens. logits (B, n, V), targets (B, n)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def greedy_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether every scored target token (not ``ignore_index`` -100) is the argmax of its
    logits: greedy decoding would say each row's target, teacher-forced. A 0-dim bool."""
    return ((logits.argmax(-1) == targets) | (targets == -100)).all()


def fast_target_logits(
    model: nn.Module,
    layers: nn.ModuleList,
    layer_index: int,
    captured: Captured,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_targets: int,
) -> torch.Tensor:
    """Logits (B, n, V) at the target positions, recomputing only the edited layer and
    those above it."""
    with replay_lower_layers(layers, layer_index, captured.lower_output):
        hidden = model.base_model(**backbone_inputs(input_ids, attention_mask)).last_hidden_state
    return target_logits(model, hidden, n_targets)


def full_target_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_targets: int
) -> torch.Tensor:
    """The plain path: the whole model, all logits, then the target positions'. Kept as
    the reference the fast path is tested against and benchmarked with."""
    logits = model(**backbone_inputs(input_ids, attention_mask)).logits
    return logits[:, -n_targets - 1 : -1]


def full_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Target NLL through `full_target_logits`."""
    return target_loss(
        full_target_logits(model, input_ids, attention_mask, targets.shape[1]), targets
    )
