"""Turning one edit (prompt, target) into the training rows WISE learns from.

Each edit becomes ``prefix_j + ". " + prompt`` for every generated prefix, plus the raw
prompt, each followed by the target tokens. Rows are left-padded so that the target
occupies the same tail positions in every row.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass
class EditRows:
    input_ids: torch.Tensor  # (R, T) left-padded; row 0 is the raw prompt
    attention_mask: torch.Tensor  # (R, T)
    prompt_mask: torch.Tensor  # (R, T) 1 on prompt tokens (prefix included), 0 on pad/target
    targets: torch.Tensor  # (R, n) the target ids, the same in every row

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


def target_ids(tokenizer, target: str) -> list[int]:
    """The target as the model should continue the prompt: with one leading space."""
    text = target if target[:1].isspace() else " " + target
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch (the layout generation uses)."""
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    return left_pad(seqs, pad_id(tokenizer))


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


def build_rows(tokenizer, prompt: str, target: str, prefixes: list[str]) -> EditRows:
    """Rows for one edit; raises ValueError for inputs that cannot be learned."""
    check_text(prompt, "edit prompt")
    check_text(target, "edit target")
    tgt = target_ids(tokenizer, target)
    if not tgt or not tokenizer.decode(tgt, skip_special_tokens=True).strip():
        raise ValueError(f"edit target {target!r} tokenizes to no tokens")
    texts = [prompt] + [f"{p}. {prompt}" for p in prefixes]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    ids, mask = left_pad([p + tgt for p in prompts], pad_id(tokenizer))
    prompt_mask = mask.clone()
    prompt_mask[:, -len(tgt) :] = 0
    targets = torch.tensor([tgt] * len(texts), dtype=torch.long)
    return EditRows(ids, mask, prompt_mask, targets)


def context_limit(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
