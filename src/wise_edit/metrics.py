"""Editing metrics, each a small function over a model (edited or not) and token ids.

Two kinds, reported side by side:
- teacher-forced token accuracy, as the reference harness computes it (comparable with
  the paper's tables): feed prompt + target, compare the argmax at each target position
  with the gold token;
- generated exact match: greedy decoding from the prompt alone, as a user would see it.

The prompt is always processed first and the target continues its KV cache, so the
routing decision is made from the prompt tokens, exactly as during generation.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from .core.rows import pad_id, target_ids

OOD_LOSS_LIMIT = -math.log(0.8)  # Temporal: a rephrase counts when P(target) > 0.8 per token
# Generated metrics decode the reference's length plus this many tokens, so an answer that
# is right but tokenized differently still fits.
EXTRA_NEW_TOKENS = 2


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def target_logits(model: nn.Module, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Logits predicting each target token: (n, V). Prefill on the prompt, then the target
    continues the cache, so routing sees only the prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    out = model(input_ids=ids, use_cache=True)
    first = out.logits[:, -1:]  # predicts target[0]
    if len(target) == 1:
        return first[0]
    rest_ids = torch.tensor([target[:-1]], device=device)
    mask = torch.ones((1, len(prompt) + len(target) - 1), dtype=torch.long, device=device)
    rest = model(
        input_ids=rest_ids, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True
    ).logits
    return torch.cat([first, rest], dim=1)[0]


def token_accuracy(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Teacher-forced share of target tokens predicted right (the paper's Rel/Gen)."""
    tgt = target_ids(tokenizer, target)
    logits = target_logits(model, _prompt_ids(tokenizer, prompt), tgt)
    return (logits.argmax(-1).cpu() == torch.tensor(tgt)).float().mean().item()


def target_predictions(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> list[int]:
    """Argmax tokens at the target positions (the locality comparison's raw material)."""
    logits = target_logits(model, _prompt_ids(tokenizer, prompt), target_ids(tokenizer, target))
    return logits.argmax(-1).tolist()


def agreement(before: list[int], after: list[int]) -> float:
    """Teacher-forced Loc: share of positions whose prediction did not change."""
    if len(before) != len(after) or not before:
        raise ValueError("locality predictions must be non-empty and of equal length")
    return sum(int(a == b) for a, b in zip(before, after)) / len(before)


def target_nll(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Mean negative log-likelihood per target token."""
    tgt = target_ids(tokenizer, target)
    logits = target_logits(model, _prompt_ids(tokenizer, prompt), tgt).float()
    return nn.functional.cross_entropy(logits.cpu(), torch.tensor(tgt)).item()


def perplexity(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Hallucination Rel: perplexity of the target given the prompt (lower is better)."""
    return math.exp(target_nll(model, tokenizer, prompt, target))


def ood_success(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Temporal OOD Gen: 1 when the target's loss is below -log(0.8)."""
    return float(target_nll(model, tokenizer, prompt, target) < OOD_LOSS_LIMIT)


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int
) -> list[int]:
    """Token ids greedy decoding adds after the prompt."""
    device = next(model.parameters()).device
    ids = torch.tensor([_prompt_ids(tokenizer, prompt)], device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id(tokenizer),
    )
    return out[0, ids.shape[1] :].tolist()


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def generated_match(model: nn.Module, tokenizer: Any, prompt: str, target: str) -> float:
    """Generated exact match: 1 when the greedy continuation starts with the target
    (whitespace and case normalised)."""
    budget = len(target_ids(tokenizer, target)) + EXTRA_NEW_TOKENS
    text = tokenizer.decode(
        greedy_continuation(model, tokenizer, prompt, budget), skip_special_tokens=True
    )
    return float(normalise(text).startswith(normalise(target)))
