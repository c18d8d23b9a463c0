"""Routing between the main memory and the side memories (Eqs. 3-6) and the margin loss
that makes it possible (Eq. 5). Pure tensor functions; the layer and the editor call them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def value_change(acts: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What a side memory adds to the value projection's output: a (W' - W)^T for inputs
    (..., I) and delta (O, I), in float32: (..., O).

    Computed as delta @ a^T: with few rows (one prompt scored against a retrieval
    candidate, one token decoded) CPU kernels run this order about twice as fast as
    a @ delta^T (0.5 against 1.1 ms for 15 tokens on SmolLM2's 576 x 1536 matrix, one
    thread), and with many rows they take the same time."""
    flat = acts.float().reshape(-1, acts.shape[-1])
    return (delta.float() @ flat.t()).t().reshape(*acts.shape[:-1], delta.shape[0])


def sequence_scores(acts: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Activation score per sequence: mean over its own non-pad tokens of ||a_t (W' - W)||.

    acts: (B, T, I) inputs of the value matrix; delta: (O, I) = W' - W; mask: (B, T), 1 for
    tokens that count. Padding never enters the score, and each row is scored alone.
    """
    per_token = torch.linalg.vector_norm(value_change(acts, delta), dim=-1)  # (B, T)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)


def margin_loss(
    edit_scores: torch.Tensor,
    irrelevant_scores: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
) -> torch.Tensor:
    """Eq. 5: irrelevant inputs below alpha, edit inputs above beta, and every
    (edit, irrelevant) pair at least gamma apart."""
    gap = edit_scores[:, None] - irrelevant_scores[None, :]  # (E, I)
    return (
        F.relu(irrelevant_scores - alpha).mean()
        + F.relu(beta - edit_scores).mean()
        + F.relu(gamma - gap).mean()
    )


def replay_loss(past_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_memo (Appendix B.3): edits that live in an earlier memory stay below alpha here."""
    return F.relu(past_scores - alpha).mean()


def threshold(prompt_scores: torch.Tensor, ratio: float) -> float:
    """epsilon = ratio * min score over a memory's edit prompts (Algorithm 1, line 4)."""
    return float(prompt_scores.min()) * ratio


def route(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 with top-1 retrieval: scores (M, B), thresholds (M,) -> (B,) index of
    the memory each row uses, -1 for the main memory. With one memory this is Eq. 6."""
    best, index = scores.max(dim=0)  # (B,), (B,)
    return torch.where(best > thresholds[index], index, torch.full_like(index, -1))


def score_unit(outputs: torch.Tensor, token_mask: torch.Tensor) -> float:
    """The unit of alpha/beta/gamma for a model: median over sequences of the mean norm
    of the value projection's output (B, T, O) on neutral text. The paper's constants
    assume a 7B model's activation scale; in this unit they mean the same on any model."""
    per_token = torch.linalg.vector_norm(outputs.float(), dim=-1)  # (B, T)
    per_seq = (per_token * token_mask).sum(-1) / token_mask.sum(-1)
    return float(per_seq.median())


def mean_inputs(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean value-matrix input over its masked tokens: (B, T, I) -> (B, I)."""
    weights = mask.to(acts.dtype).unsqueeze(-1)  # (B, T, 1)
    return (acts * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def nearest(query: torch.Tensor, keys: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``keys`` (N, I) most similar to ``query`` (I,) by
    cosine, most similar first: the unrelated prompts a router most easily confuses
    with an edit (hard negatives)."""
    sims = F.cosine_similarity(keys.float(), query.float().unsqueeze(0), dim=-1)  # (N,)
    return sims.topk(min(k, len(sims))).indices.tolist()


def key_similarity(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine of each query (B, I) with each edit key (E, I): (B, E)."""
    return F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()


def candidate_memories(
    queries: torch.Tensor,
    keys: torch.Tensor,
    owners: torch.Tensor,
    k: int,
    radius: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memories of the ``k`` edit keys (E, I) most similar by cosine to each query
    (B, I): (B, k') memory indices, k' = min(k, E), most similar first (may repeat), and
    those keys' cosines (B, k'). ``owners`` (E,) names the memory each key's edit lives
    in. With a ``radius`` > 0 a key less similar than that gives -1 (no candidate)
    instead of its memory."""
    unit = F.normalize(keys.float(), dim=-1)
    return unit_candidates(F.normalize(queries.float(), dim=-1), unit, owners, k, radius)


def unit_candidates(
    queries: torch.Tensor,
    keys: torch.Tensor,
    owners: torch.Tensor,
    k: int,
    radius: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`candidate_memories` for queries and keys already of unit length, so that a layer
    can normalise its keys once rather than on every forward (~6 ms at 3000 keys)."""
    sims, top = (queries @ keys.t()).topk(min(k, keys.shape[0]), dim=-1)  # (B, k')
    picked = owners[top]
    if radius > 0:
        picked = torch.where(sims >= radius, picked, torch.full_like(picked, -1))
    return picked, sims


def memory_nearness(
    queries: torch.Tensor, keys: torch.Tensor, owners: torch.Tensor, memories: int
) -> torch.Tensor:
    """(M, B): for each memory, the highest cosine between a query (B, I) and the keys of
    the edits it holds; -inf for a memory that holds no key."""
    sims = key_similarity(queries, keys).t()  # (E, B)
    out = torch.full((memories, sims.shape[1]), float("-inf"), device=sims.device)
    index = owners.to(sims.device)[:, None].expand_as(sims)
    return out.scatter_reduce(0, index, sims, reduce="amax")


def background_radius(keys: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of the cosine between the keys (N, I) of every pair of unrelated
    sentences: how near two texts about nothing in common come on this model and layer.
    Cosines of mean activations are far from 0 and differ from model to model, so a key
    radius is set against this background rather than as one constant for all models."""
    if len(keys) < 2:
        raise ValueError("a background needs the keys of at least two unrelated prompts")
    sims = key_similarity(keys, keys)
    upper = torch.triu_indices(len(keys), len(keys), offset=1, device=sims.device)
    value = float(torch.quantile(sims[upper[0], upper[1]], quantile))
    return min(1.0, max(0.0, value))  # rounding can take a cosine past 1


def within_radius(scores: torch.Tensor, nearness: torch.Tensor, radius: float) -> torch.Tensor:
    """Scores (M, B) of memories none of whose edit keys lies within cosine ``radius`` of
    the row's key set to -inf, so that `route` cannot pick them: a memory answers only
    prompts worded near one of its edits, whatever its activation score."""
    return scores.masked_fill(nearness < radius, float("-inf"))


# The cosine between a prompt's key and an edit's at which the prompt is taken for that
# edit's own prompt (verbatim, or a token away); on SmolLM2 paraphrases' keys lie at
# 0.86-0.98 of their edit's (p10-p90, ZsRE), and 0.98, 0.99 and 0.995 routed alike.
VERBATIM = 0.99


def candidate_scores(
    candidates: torch.Tensor, score_fn: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The exact score (B, k) of each row against each of its ``candidates`` (B, k)
    memories, -inf where there is none (-1); each memory scores only its rows."""
    batch, width = candidates.shape
    scores = torch.full((batch, width), float("-inf"), device=candidates.device)
    for memory in candidates.unique().tolist():
        if memory < 0:  # no candidate (outside the key radius)
            continue
        rows = (candidates == memory).any(dim=1)
        row_scores = torch.full((batch,), float("-inf"), device=candidates.device)
        row_scores[rows] = score_fn(memory, rows).to(row_scores)
        scores = torch.where(candidates == memory, row_scores[:, None], scores)
    return scores


def route_sparse(
    candidates: torch.Tensor,
    score_fn: Callable[[int, torch.Tensor], torch.Tensor],
    thresholds: torch.Tensor,
    similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """`route` (Algorithm 2) computed only where it can matter: each row's top-1 among
    its ``candidates`` (B, k) memories (-1: none), by exact score, then that memory's
    threshold; ties go to the lower memory index, as in `route`.

    One exception, given the candidates' key cosines ``similarity`` (B, k): when the
    row's key is an edit's own (>= `VERBATIM`), that edit's memory answers if its score
    clears its own threshold, rather than the top scorer. Scores of different memories
    are not on one scale, and with many memories an edit prompt is often cleared by its
    own memory and by a neighbour trained on a similar prompt; the top score then gave
    the neighbour 5-8% of ZsRE's edit prompts at T = 100-1000 (docs/RESULTS.md). Whether
    a side memory answers at all is unchanged, so locality is too.
    ``score_fn(memory, rows)`` gives the scores of the rows (a bool mask) against one
    memory."""
    scores = candidate_scores(candidates, score_fn)
    held = candidates >= 0
    best = scores.max(dim=1).values  # (B,)
    above_all = torch.iinfo(torch.long).max  # never the lowest index at the top score
    at_top = held & (scores == best[:, None])
    top = torch.where(at_top, candidates, above_all).min(dim=1).values
    top = top.clamp(max=len(thresholds) - 1)  # rows without candidates: not routed below
    routed = (best > float("-inf")) & (best > thresholds[top])
    answer = top
    if similarity is not None:
        clears = held & (scores > thresholds[candidates.clamp(min=0)])
        verbatim = clears & (similarity >= VERBATIM)  # (B, k)
        first = verbatim.to(torch.uint8).argmax(dim=1)  # the most similar such key
        mine = candidates.gather(1, first[:, None]).squeeze(1)
        answer = torch.where(verbatim.any(dim=1), mine, top)
    return torch.where(routed, answer, torch.full_like(answer, -1))
