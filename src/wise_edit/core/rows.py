"""Turning one edit (prompt, target) into the training rows WISE learns from.

Each edit becomes ``prefix_j + ". " + prompt`` for every generated prefix, plus the
prompt alone, each written in the editor's `PromptFormat` (raw text or a chat turn) and
followed by the target tokens and, unless turned off, the token that ends the answer
(EOS, or the chat template's end of turn): an edit that is not trained to stop is said
and then continued with whatever the model says next. Rows are left-padded so that the
target occupies the same tail positions in every row.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .prompts import PromptFormat, target_ids

__all__ = [
    "EditRows",
    "build_answer_rows",
    "build_rows",
    "check_text",
    "encode_prompts",
    "left_pad",
    "pad_id",
    "target_ids",
]

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class EditRows:
    input_ids: torch.Tensor  # (R, T) left-padded; row 0 is the raw prompt
    attention_mask: torch.Tensor  # (R, T)
    # (R, T) 1 on the prompt tokens a routing score reads (augmentation prefix included,
    # a chat template's fixed tokens not), 0 on pad and target
    prompt_mask: torch.Tensor
    targets: torch.Tensor  # (R, n) the target ids (and the stop), the same in every row

    def take(self, index: list[int]) -> tuple[EditRows, int]:
        """Rows ``index`` alone, without the columns that are padding in every one of
        them; returns them and the number of leading columns dropped (positions are
        counted from the first real token, so what the model computes is unchanged)."""
        mask = self.attention_mask[index]
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())
        parts = (self.input_ids, self.attention_mask, self.prompt_mask)
        return EditRows(*(t[index, start:] for t in parts), self.targets[index]), start

    @classmethod
    def join(cls, parts: Sequence[EditRows], pad: int = 0) -> EditRows:
        """The rows of several `EditRows` in one batch, in order, left-padded to the
        widest (``pad``: the id of padding tokens) and their targets to the longest with
        `IGNORE`: one forward for several edits. `take` gives each part back."""
        width = max(p.input_ids.shape[1] for p in parts)
        n = max(p.targets.shape[1] for p in parts)

        def padded(t: torch.Tensor, size: int, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (size - t.shape[1], 0), value=value)

        return cls(
            torch.cat([padded(p.input_ids, width, pad) for p in parts]),
            torch.cat([padded(p.attention_mask, width, 0) for p in parts]),
            torch.cat([padded(p.prompt_mask, width, 0) for p in parts]),
            torch.cat([padded(p.targets, n, IGNORE) for p in parts]),
        )

    def to(self, device: torch.device) -> EditRows:
        return EditRows(
            *(
                t.to(device)
                for t in (self.input_ids, self.attention_mask, self.prompt_mask, self.targets)
            )
        )


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def encode_prompts(fmt: PromptFormat, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch (the layout generation uses) and its attention mask."""
    seqs = [fmt.prompt_ids(p) for p in prompts]
    return left_pad(seqs, pad_id(fmt.tokenizer))


def check_text(text: str, what: str) -> None:
    """Raise ValueError for text that cannot be an edit's prompt or target: invalid
    Unicode (a lone surrogate), nothing at all, or nothing a person could see (only
    spaces, control or zero-width characters)."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode ({err.reason} at {err.start})") from None
    if not text.strip():
        raise ValueError(f"{what} is empty")
    if not any(unicodedata.category(c)[0] not in "CZ" for c in text):
        raise ValueError(f"{what} {text!r} has no visible characters")


def build_rows(
    fmt: PromptFormat, prompt: str, target: str, prefixes: list[str], stop: bool = False
) -> EditRows:
    """Rows for one edit, ``stop``: the target is followed by ``fmt.stop``. Raises
    ValueError for inputs that cannot be learned."""
    check_text(prompt, "edit prompt")
    check_text(target, "edit target")
    tokenizer = fmt.tokenizer
    tgt = fmt.target_ids(target)
    if not tgt or not tokenizer.decode(tgt, skip_special_tokens=True).strip():
        raise ValueError(f"edit target {target!r} tokenizes to no tokens")
    if stop and fmt.stop is not None:
        tgt = tgt + [fmt.stop]
    texts = [prompt] + [f"{p}. {prompt}" for p in prefixes]
    prompts = [fmt.prompt_ids(t) for t in texts]
    ids, mask = left_pad([p + tgt for p in prompts], pad_id(tokenizer))
    prompt_mask = mask.clone()
    prompt_mask[:, -len(tgt) :] = 0
    prompt_mask = fmt.content_mask(ids, prompt_mask)
    targets = torch.tensor([tgt] * len(texts), dtype=torch.long)
    return EditRows(ids, mask, prompt_mask, targets)


IGNORE = -100  # a target position that is not scored (cross_entropy's ignore_index)


def build_answer_rows(
    fmt: PromptFormat, pairs: list[tuple[str, str]], stop: bool = False
) -> EditRows:
    """One row per (prompt, target) of several edits: the prompt alone followed by its
    own target (and the stop). Targets differ in length, so ``targets`` is (R, n) with n
    the longest, right-aligned like the rows, and `IGNORE` where a row's target is
    shorter (those positions predict prompt tokens)."""
    tails = []
    for _, target in pairs:
        tgt = fmt.target_ids(target)
        tails.append(tgt + [fmt.stop] if stop and fmt.stop is not None else tgt)
    ids, mask = left_pad(
        [fmt.prompt_ids(p) + t for (p, _), t in zip(pairs, tails)], pad_id(fmt.tokenizer)
    )
    n = max(len(t) for t in tails)
    targets = torch.full((len(pairs), n), IGNORE, dtype=torch.long)
    prompt_mask = mask.clone()
    for row, tail in enumerate(tails):
        targets[row, n - len(tail) :] = torch.tensor(tail)
        prompt_mask[row, -len(tail) :] = 0
    return EditRows(ids, mask, fmt.content_mask(ids, prompt_mask), targets)


def context_limit(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stack_ragged(
    acts: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of (t_i, I) activations into (N, T, I), left-aligned to the end like
    `left_pad`, with a token mask (N, T)."""
    width = max(a.shape[0] for a in acts)
    out = torch.zeros((len(acts), width, acts[0].shape[1]), dtype=acts[0].dtype)
    _, mask = left_pad([[1] * a.shape[0] for a in acts], 0)
    for row, a in enumerate(acts):
        out[row, width - a.shape[0] :] = a
    return out.to(device), mask.to(device)
