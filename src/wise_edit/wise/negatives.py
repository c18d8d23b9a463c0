"""The unrelated prompts an edit's margin loss pushes below alpha (Eq. 5): a random draw
from the pool, as in the paper, and hard negatives, the pool prompts nearest to the edit
prompt - typically its own sentence form about another subject, the prompts a router
trained on random negatives lets in."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.rows import stack_ragged
from ..core.seeds import candidate_generator
from .router import Acts

# Pool prompts (drawn once with the seed) that hard negatives are chosen among: their
# activations are computed once per editor, so an edit's hard negatives cost no forward.
HARD_NEGATIVE_CANDIDATES = 256
# Prompts per forward while the pool is computed: fixed, so values are the same on reload.
POOL_BATCH = 32

PromptActs = Callable[[list[str]], Acts]  # a prompt batch -> its inputs and routing mask


def nearest(query: torch.Tensor, keys: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``keys`` (N, I) most similar to ``query`` (I,) by
    cosine, most similar first."""
    sims = F.cosine_similarity(keys.float(), query.float().unsqueeze(0), dim=-1)  # (N,)
    return sims.topk(min(k, len(sims))).indices.tolist()


def routed_rows(acts: Acts) -> list[torch.Tensor]:
    """Each prompt's routed-token inputs (t_i, I), on the CPU."""
    return [a[m.bool()].cpu() for a, m in zip(*acts)]


class NegativePool:
    """Unrelated prompts with their routed-token value-matrix inputs (t_i, I) and mean
    inputs (N, I), the keys hard negatives are chosen by."""

    def __init__(self, prompts: list[str], acts: list[torch.Tensor]) -> None:
        self.prompts, self.acts = prompts, acts
        self.keys = torch.stack([a.float().mean(0) for a in acts])

    @classmethod
    @torch.no_grad()
    def build(cls, pool: list[str], seed: int, prompt_acts: PromptActs) -> NegativePool:
        """A seeded sample of `HARD_NEGATIVE_CANDIDATES` pool prompts, computed once
        (they are frozen below the edited layer)."""
        order = torch.randperm(len(pool), generator=candidate_generator(seed))
        prompts = [pool[i] for i in order[:HARD_NEGATIVE_CANDIDATES].tolist()]
        acts: list[torch.Tensor] = []
        for i in range(0, len(prompts), POOL_BATCH):
            acts += routed_rows(prompt_acts(prompts[i : i + POOL_BATCH]))
        return cls(prompts, acts)

    def nearest(self, query: torch.Tensor, count: int, taken: set[str]) -> list[int]:
        """The ``count`` prompts most similar to an edit prompt's mean input ``query`` (I,)
        and not in ``taken``: the prompts a router most easily confuses with it."""
        picks = nearest(query.cpu(), self.keys, count + len(taken))
        return [i for i in picks if self.prompts[i] not in taken][:count]


def negatives(
    drawn: list[str],
    prompt_acts: PromptActs,
    pool: NegativePool | None,
    query: torch.Tensor,
    hard: int,
    device: torch.device,
) -> Acts:
    """The unrelated rows of one edit: the randomly ``drawn`` prompts and, from ``pool``,
    the ``hard`` prompts nearest to the edit's key ``query`` (I,), padded into one batch."""
    rows = routed_rows(prompt_acts(drawn))
    if hard and pool is not None:
        rows += [pool.acts[i] for i in pool.nearest(query, hard, taken=set(drawn))]
    return stack_ragged(rows, device)
