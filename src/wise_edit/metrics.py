"""Editing metrics, each a small function over a model (edited or not), the
`PromptFormat` prompts are written in (raw text or a chat turn), and strings.

Reported side by side:
- teacher-forced token accuracy, as the reference harness computes it (comparable with
  the paper's tables): feed prompt + target, compare the argmax at each target position
  with the gold token;
- answer exact match, what a user sees: greedy decoding until the model stops (the
  format's stop or EOS, or the first newline), at most `ANSWER_NEW_TOKENS`; the whole
  answer must equal the target up to case, whitespace and trailing punctuation;
- prefix exact match (the earlier "generated EM"): the first len(target) + 2 generated
  tokens start with the target; it cannot see an answer that does not stop;
- reply contains (chat): the target appears in the assistant's reply.

The prompt is always processed first and the target continues its KV cache, so the
routing decision is made from the prompt tokens, exactly as during generation.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.attach import cache_argument, returned_cache
from .core.prompts import PromptFormat
from .core.rows import pad_id

OOD_LOSS_LIMIT = -math.log(0.8)  # Temporal: a rephrase counts when P(target) > 0.8 per token
# Prefix EM decodes the reference's length plus this many tokens, so an answer that is
# right but tokenized differently still fits.
EXTRA_NEW_TOKENS = 2
# Answers (and locality continuations) are generated for at most this many tokens: the
# budget of the published free-generation re-evaluations.
ANSWER_NEW_TOKENS = 24
_TRAILING = string.punctuation + " "


def target_logits(model: nn.Module, prompt: list[int], target: list[int]) -> torch.Tensor:
    """Logits predicting each target token: (n, V). Prefill on the prompt, then the target
    continues the cache, so routing sees only the prompt."""
    return batch_target_logits(model, [prompt], [target])[0]


@torch.no_grad()
def batch_target_logits(
    model: nn.Module, prompts: list[list[int]], targets: list[list[int]]
) -> torch.Tensor:
    """`target_logits` of several (prompt, target) pairs in one batch: (B, n, V). All
    prompts must have one token length and all targets another: without padding a row is
    attended, positioned and routed as it would be alone (routing reads the prefill), and
    only the kernels' summation order can differ from scoring it alone."""
    if len({len(p) for p in prompts}) != 1 or len({len(t) for t in targets}) != 1:
        raise ValueError("a scoring batch takes prompts of one length and targets of another")
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    out = model(input_ids=ids, use_cache=True)
    first = out.logits[:, -1:]  # predicts target[0]
    if len(targets[0]) == 1:
        return first
    rest_ids = torch.tensor([t[:-1] for t in targets], device=device)
    mask = torch.ones(
        (len(prompts), ids.shape[1] + rest_ids.shape[1]), dtype=torch.long, device=device
    )
    cache = {cache_argument(model): returned_cache(out)}
    rest = model(input_ids=rest_ids, attention_mask=mask, use_cache=True, **cache).logits
    return torch.cat([first, rest], dim=1)


def batch_target_predictions(
    model: nn.Module, prompts: list[list[int]], targets: list[list[int]]
) -> list[list[int]]:
    """`batch_target_logits`' argmax: each pair's predicted token at each target position."""
    return batch_target_logits(model, prompts, targets).argmax(-1).tolist()


def token_accuracy(model: nn.Module, fmt: PromptFormat, prompt: str, target: str) -> float:
    """Teacher-forced share of target tokens predicted right (the paper's Rel/Gen)."""
    tgt = fmt.target_ids(target)
    logits = target_logits(model, fmt.prompt_ids(prompt), tgt)
    return forced_accuracy(logits.argmax(-1).tolist(), tgt)


def forced_accuracy(predicted: list[int], target: list[int]) -> float:
    """Share of target tokens the teacher-forced argmax ``predicted`` gets right."""
    if len(predicted) != len(target) or not target:
        raise ValueError("predictions and target must be non-empty and of equal length")
    return sum(int(a == b) for a, b in zip(predicted, target)) / len(target)


def target_predictions(model: nn.Module, fmt: PromptFormat, prompt: str, target: str) -> list[int]:
    """Argmax tokens at the target positions (the locality comparison's raw material)."""
    logits = target_logits(model, fmt.prompt_ids(prompt), fmt.target_ids(target))
    return logits.argmax(-1).tolist()


def agreement(before: list[int], after: list[int]) -> float:
    """Teacher-forced Loc: share of positions whose prediction did not change."""
    if len(before) != len(after) or not before:
        raise ValueError("locality predictions must be non-empty and of equal length")
    return sum(int(a == b) for a, b in zip(before, after)) / len(before)


def target_nll(model: nn.Module, fmt: PromptFormat, prompt: str, target: str) -> float:
    """Mean negative log-likelihood per target token."""
    tgt = fmt.target_ids(target)
    logits = target_logits(model, fmt.prompt_ids(prompt), tgt).float()
    return nn.functional.cross_entropy(logits.cpu(), torch.tensor(tgt)).item()


def perplexity(model: nn.Module, fmt: PromptFormat, prompt: str, target: str) -> float:
    """Hallucination Rel: perplexity of the target given the prompt (lower is better)."""
    return math.exp(target_nll(model, fmt, prompt, target))


def ood_success(model: nn.Module, fmt: PromptFormat, prompt: str, target: str) -> float:
    """Temporal OOD Gen: 1 when the target's loss is below -log(0.8)."""
    return float(target_nll(model, fmt, prompt, target) < OOD_LOSS_LIMIT)


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, fmt: PromptFormat, prompt: str, max_new_tokens: int
) -> list[int]:
    """Token ids greedy decoding adds after the prompt, up to and including the first of
    the format's stop tokens (`PromptFormat.stop_ids`)."""
    return greedy_continuations(model, fmt, [fmt.prompt_ids(prompt)], max_new_tokens)[0]


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, fmt: PromptFormat, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """`greedy_continuation` of several prompts in one batch. They must have one token
    length: without padding a row attends, is positioned and is routed as it would be
    alone, and only the kernels' summation order can differ from decoding it alone."""
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("a decoding batch takes prompts of one token length (no padding)")
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    stops = fmt.stop_ids()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops or None,
        pad_token_id=pad_id(fmt.tokenizer),
    )
    rows = out[:, ids.shape[1] :].tolist()
    # a row that stopped before the batch did is padded after its stop token
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


DECODE_BATCH = 16  # prompts decoded together by `Decoder.prefetch`


class Decoder:
    """Greedy continuations of one model state, remembered per prompt.

    Greedy decoding cut at n tokens is the decoding with a budget of n, and one that
    stopped by itself is the same under any larger budget; so the metrics that read the
    same prompt's answer (answer EM, prefix EM, reply contains) share one decoding rather
    than each paying for its own, which halves the cost of scoring long targets. Make a
    new one whenever the model changes (pre-edit, after the edits).

    `prefetch` decodes many prompts ahead in batches of ``batch_size`` (one token length
    per batch, so nothing is padded and a prompt is attended and routed as it would be
    alone): a decoding step is bound by reading the weights, which a batch reads once for
    all of its prompts. ``batch_size`` 1 decodes every prompt alone. ``progress``: a bar while
    `prefetch` decodes, since that is where an evaluation of long answers spends its
    time."""

    def __init__(
        self,
        model: nn.Module,
        fmt: PromptFormat,
        batch_size: int = DECODE_BATCH,
        progress: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"decoding batch size must be >= 1, got {batch_size}")
        self.model, self.fmt, self.batch_size = model, fmt, batch_size
        self.progress = progress
        self._done: dict[str, tuple[int, list[int]]] = {}  # prompt -> (budget, ids)
        self._forced: dict[tuple[str, str], list[int]] = {}  # (prompt, target) -> argmax
        self.decodings = 0  # how many decodings ran (the rest were cut from these)

    def _has(self, prompt: str, max_new_tokens: int) -> bool:
        budget, ids = self._done.get(prompt, (0, []))
        return budget >= max_new_tokens or bool(budget and len(ids) < budget)

    def __call__(self, prompt: str, max_new_tokens: int) -> list[int]:
        if self._has(prompt, max_new_tokens):
            return self._done[prompt][1][:max_new_tokens]
        ids = greedy_continuation(self.model, self.fmt, prompt, max_new_tokens)
        self._done[prompt] = (max_new_tokens, ids)
        self.decodings += 1
        return ids

    def prefetch(self, wanted: Iterable[tuple[str, int]]) -> None:
        """Decode ahead each (prompt, budget) not yet covered; later calls cut from these.
        A batch decodes to its largest budget (a longer decoding serves a shorter one)."""
        if self.batch_size == 1:
            return
        need: dict[str, int] = {}
        for prompt, budget in wanted:
            if not self._has(prompt, budget):
                need[prompt] = max(budget, need.get(prompt, 0))
        by_length: dict[int, list[tuple[int, str, list[int]]]] = defaultdict(list)
        for prompt, budget in need.items():
            ids = self.fmt.prompt_ids(prompt)
            by_length[len(ids)].append((budget, prompt, ids))
        shown = self.progress and bool(need)
        with tqdm(
            total=len(need), desc="decoding", unit="prompt", leave=False, disable=not shown
        ) as bar:
            for group in by_length.values():
                group.sort()  # like budgets together
                for i in range(0, len(group), self.batch_size):
                    chunk = group[i : i + self.batch_size]
                    budget = chunk[-1][0]
                    rows = greedy_continuations(self.model, self.fmt, [c[2] for c in chunk], budget)
                    for (_, prompt, _), row in zip(chunk, rows):
                        self._done[prompt] = (budget, row)
                    self.decodings += len(chunk)
                    bar.update(len(chunk))

    def forced(self, prompt: str, target: str) -> list[int]:
        """The argmax token at each target position, the target fed after the prompt
        (teacher forcing: `target_predictions`)."""
        key = (prompt, target)
        if key not in self._forced:
            self._forced[key] = target_predictions(self.model, self.fmt, prompt, target)
        return self._forced[key]

    def prefetch_forced(self, wanted: Iterable[tuple[str, str]]) -> None:
        """`forced` of each (prompt, target) ahead, in batches of ``batch_size`` of one
        prompt length and one target length (so nothing is padded). A forward is bound by
        reading the weights on a GPU and by per-call overhead on a CPU for such short
        rows; a batch pays either once."""
        if self.batch_size == 1:
            return
        groups: dict[tuple[int, int], list[tuple[tuple[str, str], list[int], list[int]]]]
        groups = defaultdict(list)
        for key in dict.fromkeys(wanted):
            if key not in self._forced:
                prompt_ids, target = self.fmt.prompt_ids(key[0]), self.fmt.target_ids(key[1])
                groups[len(prompt_ids), len(target)].append((key, prompt_ids, target))
        total = sum(len(g) for g in groups.values())
        with tqdm(
            total=total, desc="teacher forcing", unit="prompt", leave=False,
            disable=not (self.progress and total),
        ) as bar:  # fmt: skip
            for group in groups.values():
                for i in range(0, len(group), self.batch_size):
                    chunk = group[i : i + self.batch_size]
                    rows = batch_target_predictions(
                        self.model, [c[1] for c in chunk], [c[2] for c in chunk]
                    )
                    for (key, _, _), row in zip(chunk, rows):
                        self._forced[key] = row
                    bar.update(len(chunk))


def normalise(text: str) -> str:
    """Whitespace collapsed, lower case."""
    return re.sub(r"\s+", " ", text).strip().lower()


def normalise_answer(text: str) -> str:
    """`normalise`, then trailing punctuation dropped ("Paris." == "paris")."""
    return normalise(text).rstrip(_TRAILING)


def reply_text(fmt: PromptFormat, ids: list[int]) -> str:
    """The generated ids up to the first stop token, as text."""
    stops = set(fmt.stop_ids())
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return fmt.tokenizer.decode(ids[:end], skip_special_tokens=True)


def answer_text(fmt: PromptFormat, ids: list[int]) -> str:
    """The answer in generated ids: the reply up to its first newline (leading
    whitespace skipped)."""
    return reply_text(fmt, ids).lstrip().split("\n", 1)[0]


def exact_answer(answer: str, target: str) -> float:
    """1 when the whole answer is the target, up to case, whitespace and trailing
    punctuation; an answer that goes on after the target is wrong."""
    return float(normalise_answer(answer) == normalise_answer(target))


def starts_with(text: str, target: str) -> float:
    """1 when the text starts with the target (whitespace and case normalised)."""
    return float(normalise(text).startswith(normalise(target)))


def contains(text: str, target: str) -> float:
    """1 when the target appears in the text (whitespace and case normalised)."""
    return float(normalise_answer(target) in normalise(text))


def answer_budget(fmt: PromptFormat, target: str) -> int:
    """Tokens decoded for an answer: the answers' budget, or the target and a little
    more where it is longer, so that a right long answer can stop."""
    return max(ANSWER_NEW_TOKENS, len(fmt.target_ids(target)) + EXTRA_NEW_TOKENS)


def answer_match(
    model: nn.Module, fmt: PromptFormat, prompt: str, target: str, decode: Decoder | None = None
) -> float:
    """Answer exact match: generate until the model stops, compare the whole answer."""
    ids = (decode or Decoder(model, fmt))(prompt, answer_budget(fmt, target))
    return exact_answer(answer_text(fmt, ids), target)


def prefix_match(
    model: nn.Module, fmt: PromptFormat, prompt: str, target: str, decode: Decoder | None = None
) -> float:
    """Prefix exact match: the first len(target) + 2 generated tokens start with the
    target (what "generated EM" meant before answers were required to stop)."""
    budget = len(fmt.target_ids(target)) + EXTRA_NEW_TOKENS
    ids = (decode or Decoder(model, fmt))(prompt, budget)
    return starts_with(fmt.tokenizer.decode(ids, skip_special_tokens=True), target)


def reply_contains(
    model: nn.Module, fmt: PromptFormat, prompt: str, target: str, decode: Decoder | None = None
) -> float:
    """Chat: the target appears in the assistant's reply (until its end of turn)."""
    ids = (decode or Decoder(model, fmt))(prompt, ANSWER_NEW_TOKENS)
    return contains(reply_text(fmt, ids), target)
