"""How a prompt and its answer are written for the model: as raw text ("raw") or in the
tokenizer's chat template ("chat", user turn = prompt, assistant turn = answer).

One `PromptFormat` is the single place that turns a prompt into token ids, an answer
into target ids, and knows the token an answer ends with (the tokenizer's EOS for raw
text, the end-of-turn token for chat). Editing rows, the routing query, the metrics and
the CLI all go through it, so an edit is trained in exactly the form it is asked in.

A chat template wraps every prompt in the same fixed tokens (system turn, role
headers). `content_mask` marks the tokens that differ between prompts, so a routing
score averaged over a sequence is not dominated by what every chat prompt shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

FormatName = Literal["auto", "raw", "chat"]
FORMAT_NAMES = ("auto", "raw", "chat")
# Two contents that share no first or last character: their renderings differ exactly
# where the content is, so the common prefix / suffix are the template's fixed tokens.
_PROBES = ("0 zero", "Nine 9")


def target_ids(tokenizer: Any, target: str) -> list[int]:
    """A raw answer as the model should continue the prompt: with one leading space."""
    text = target if target[:1].isspace() else " " + target
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(tokenizer: Any, name: str) -> str:
    """``auto``: chat when the tokenizer has a chat template, else raw."""
    if name not in FORMAT_NAMES:
        raise ValueError(f"prompt_format must be one of {FORMAT_NAMES}, got {name!r}")
    if name == "chat" and not has_chat_template(tokenizer):
        raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
    if name == "auto":
        return "chat" if has_chat_template(tokenizer) else "raw"
    return name


def common_prefix(a: list[int], b: list[int]) -> list[int]:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def common_suffix(a: list[int], b: list[int]) -> list[int]:
    return common_prefix(a[::-1], b[::-1])[::-1]


def strip_affixes(ids: list[int], prefix: list[int], suffix: list[int]) -> tuple[int, int]:
    """How many leading / trailing tokens of ``ids`` are the template's (0 where the
    sequence does not carry that part of the template), always leaving one token."""
    head = len(prefix) if prefix and ids[: len(prefix)] == prefix else 0
    tail = len(suffix) if suffix and ids[len(ids) - len(suffix) :] == suffix else 0
    if head + tail >= len(ids):
        return 0, 0
    return head, tail


def content_mask(
    ids: torch.Tensor, mask: torch.Tensor, prefix: list[int], suffix: list[int]
) -> torch.Tensor:
    """``mask`` (B, T) with each row's template tokens (a leading ``prefix``, a trailing
    ``suffix``, among its real tokens) set to 0; rows without the template keep theirs."""
    out = mask.clone()
    for row in range(ids.shape[0]):
        real = mask[row].bool().nonzero().flatten()
        if not len(real):
            continue
        start, end = int(real[0]), int(real[-1]) + 1
        head, tail = strip_affixes(ids[row, start:end].tolist(), prefix, suffix)
        out[row, start : start + head] = 0
        out[row, end - tail : end] = 0
    return out


@dataclass(frozen=True)
class PromptFormat:
    """A tokenizer and the form prompts take for it (``kind`` "raw" or "chat")."""

    tokenizer: Any
    kind: str
    prefix: tuple[int, ...] = ()  # chat: the template's tokens before the user's text
    suffix: tuple[int, ...] = ()  # chat: ... after it, up to the assistant's first token
    stop: int | None = None  # the token an answer ends with; None: the tokenizer has none

    @classmethod
    def create(cls, tokenizer: Any, name: str = "auto") -> PromptFormat:
        kind = resolve_format(tokenizer, name)
        if kind == "raw":
            eos = tokenizer.eos_token_id
            return cls(tokenizer, "raw", stop=None if eos is None else int(eos))
        a, b = (_chat_ids(tokenizer, p) for p in _PROBES)
        return cls(
            tokenizer,
            "chat",
            prefix=tuple(common_prefix(a, b)),
            suffix=tuple(common_suffix(a, b)),
            stop=_turn_end(tokenizer),
        )

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat"

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt as the model reads it: raw text, or a user turn followed by the
        assistant header (the generation prompt)."""
        if self.is_chat:
            return _chat_ids(self.tokenizer, prompt)
        return self.tokenizer(prompt)["input_ids"]

    def target_ids(self, target: str) -> list[int]:
        """The answer's tokens: raw continues the prompt after one space; chat is the
        assistant's text itself."""
        if self.is_chat:
            return self.tokenizer(target.strip(), add_special_tokens=False)["input_ids"]
        return target_ids(self.tokenizer, target)

    def stop_ids(self) -> list[int]:
        """Tokens at which generation of an answer ends (the answer's stop and EOS)."""
        ids = {self.stop, self.tokenizer.eos_token_id}
        return sorted(int(i) for i in ids if i is not None)

    def content_mask(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The tokens a routing score should read: all real tokens for raw prompts, the
        user's text for chat prompts (see `content_mask`)."""
        if not self.is_chat:
            return mask
        return content_mask(ids, mask, list(self.prefix), list(self.suffix))


def _chat_ids(tokenizer: Any, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turn_end(tokenizer: Any) -> int | None:
    """The first token the template writes after an assistant message: its end of turn
    (falls back to EOS when the template writes nothing after the message)."""
    marker = "Nine 9"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "0"}, {"role": "assistant", "content": marker}],
        tokenize=False,
    )
    tail = text[text.rindex(marker) + len(marker) :]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    if ids:
        return int(ids[0])
    eos = tokenizer.eos_token_id
    return None if eos is None else int(eos)
