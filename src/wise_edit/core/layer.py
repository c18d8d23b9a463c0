"""The wrapped-layer base every method's layer builds on, and the per-sequence routing
decision it holds while a sequence is generated.

A method's layer answers one question for routing, `route(acts, token_mask)`: which of
its edit memories each sequence uses (-1: none, the unedited layer). Its forward and the
editor's `routed(prompts)` query both go through that one function.

What one call is doing (its routing decision, an edit's trial state, the unedited view)
is held per thread, so that concurrent calls - generation requests served while an edit
trains - never see each other's decisions or an edit that has not committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..families import weight_out_in


class RoutingState:
    """The decision of the sequences currently being processed, for layers that decide
    per sequence.

    A new sequence is decided from its prompt once; every later forward over the same
    sequence (generation steps) reuses that decision instead of re-deciding from new
    tokens. A later forward continues the sequence when it continues a KV cache, or,
    without a cache (``use_cache=False``), when its input is the previous forward's
    input plus one token. ``token_mask`` is the current attention mask.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.choice: torch.Tensor | None = None
        self.pending = True
        self._last_ids: torch.Tensor | None = None  # input of the last cache-less forward
        # a lower decoder layer's output in this forward (B, T, H), for routing that reads
        # it (WISE's subject gate); set by that layer's hook, cleared when a forward starts
        self.lower: torch.Tensor | None = None

    def begin(self, token_mask: torch.Tensor | None, input_ids: torch.Tensor | None = None) -> None:
        """A forward without a KV cache: a new sequence, unless it is the last one grown
        by one token (generation without a cache), which keeps the decision."""
        last, self._last_ids = self._last_ids, input_ids
        self.lower = None
        if self.choice is not None and _grown_by_one(last, input_ids):
            self.token_mask, self.pending = token_mask, False
            return
        self.token_mask, self.choice, self.pending = token_mask, None, True

    def hold(self) -> None:
        """A forward that continues a KV cache: keep the decision."""
        self.pending = False
        self._last_ids = None
        self.lower = None

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


def _grown_by_one(last: torch.Tensor | None, ids: torch.Tensor | None) -> bool:
    """Whether ``ids`` (B, T+1) is ``last`` (B, T) with one more token per row."""
    if last is None or ids is None or ids.dim() != 2 or last.dim() != 2:
        return False
    if ids.shape[0] != last.shape[0] or ids.shape[1] != last.shape[1] + 1:
        return False
    return bool(torch.equal(ids[:, :-1], last.to(ids.device)))


def last_positions(token_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (left or right padding)."""
    width = token_mask.shape[1]
    return width - 1 - token_mask.flip(-1).float().argmax(-1)


def last_token(acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Each row's activation (B, I) at its last real token."""
    rows = torch.arange(acts.shape[0], device=acts.device)
    return acts[rows, last_positions(token_mask).to(acts.device)]


def unrouted(acts: torch.Tensor) -> torch.Tensor:
    """The decision "no edit memory" for every row of ``acts`` (B, ...)."""
    return torch.full((acts.shape[0],), -1, dtype=torch.long, device=acts.device)


class _CallState(threading.local):
    """What the calls of one thread are doing on a layer: their routing decision, the
    trial state of an edit being trained, whether they see the unedited layer."""

    def __init__(self) -> None:
        self.routing = RoutingState()
        self.trial: Any = None
        self.disabled = False


class AttachedLayer(nn.Module):
    """Base of every module wise-edit puts in place of a model's linear layer: it keeps
    the original as ``base_layer`` (bias and GPT-2 Conv1D layout included) and can be
    switched off (``disabled``) to behave exactly as the unedited model.

    ``routing``, ``trial`` and ``disabled`` belong to the calling thread: a decision
    made for one request, or an edit training in one thread, is invisible to others."""

    # True: routing averages a score over the sequence's tokens, so the routing mask
    # leaves out a chat template's fixed tokens; False: the mask marks every real token
    # (layers that read the last token, which must be the one the edit trained at).
    reads_content: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._calls = _CallState()

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles start with fresh per-thread state (a thread-local cannot be
        copied)."""
        state = self.__dict__.copy()
        state.pop("_calls", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._calls = _CallState()

    @property
    def routing(self) -> RoutingState:
        """The calling thread's routing decision."""
        return self._calls.routing

    @property
    def _trial(self) -> Any:
        return self._calls.trial

    @property
    def _disabled(self) -> bool:
        return self._calls.disabled

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped matrix in (out, in) layout."""
        return weight_out_in(self.base_layer)

    @contextmanager
    def trial(self, state: Any) -> Iterator[None]:
        """Compute with ``state`` (what an edit is training, in the form the layer's
        forward reads) instead of what is committed: the editing forward."""
        with self._for_this_call("trial", state):
            yield

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Behave as the unedited layer (pre-edit scores, prefix generation)."""
        with self._for_this_call("disabled", True):
            yield

    @contextmanager
    def _for_this_call(self, name: str, value: Any) -> Iterator[None]:
        """Set one of this thread's call settings for the block, then put it back."""
        calls = self._calls
        previous = getattr(calls, name)
        setattr(calls, name, value)
        try:
            yield
        finally:
            setattr(calls, name, previous)

    def route(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Which edit memory each sequence uses: (B,) long, -1 = the unedited layer.
        ``acts`` (B, T, I) are the layer's inputs, ``token_mask`` (B, T) its real tokens.
        The base answers 0 for every row: the layer's one change applies everywhere."""
        return torch.zeros(acts.shape[0], dtype=torch.long, device=acts.device)

    def route_scores(self, acts: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor | None:
        """The score each row's routing decision compares with a threshold (B,), for
        plots; None for layers without one."""
        return None
