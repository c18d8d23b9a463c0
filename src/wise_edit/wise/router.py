"""The router (§2.2, Eqs. 3-6, Algorithm 2): which side memory, if any, answers a sequence,
and the margin loss that teaches a memory to be chosen only for its edits (Eq. 5).

Every routing rule is decided in one function, `route`:
1. the activation score of a sequence against a memory, ||a (W' - W)|| averaged over its
   tokens, must clear that memory's threshold epsilon (Eq. 6; Algorithm 2 takes the
   top-1 memory among several);
2. with many memories, only the memories of the sequence's ``candidates`` nearest edit
   keys (cosine of the mean value-matrix input) are scored - a retrieval index that
   cannot change the top-1 of the memories it scores;
3. a memory may answer only within the key radius of one of its edits' keys;
4. a sequence that repeats an edit's own prompt (key cosine >= `VERBATIM`) goes to that
   edit's memory if it clears there, rather than to a neighbour that scores higher;
5. the subject gate: a memory whose edits name subjects answers only sequences with a
   token near one of those subjects' keys (`subject_gate`).
Pure tensor functions; the layer calls `route`, the editor's loss calls the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

# The cosine between a prompt's key and an edit's at which the prompt is taken for that
# edit's own prompt (verbatim, or a token away): paraphrases' keys lie below it.
VERBATIM = 0.99

Scorer = Callable[[int, torch.Tensor], torch.Tensor]  # (memory, rows mask) -> scores (r,)
Acts = tuple[torch.Tensor, torch.Tensor]  # (N, T, I) value-matrix inputs, (N, T) token mask


class Factors(NamedTuple):
    """A compact side memory's W' - W as the product ``up @ down``, (O, R) @ (R, I),
    never formed: applying it costs (O + I) R per token instead of O I."""

    up: torch.Tensor
    down: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.up.float() @ self.down.float()


Change = torch.Tensor | Factors  # what a side memory adds to the value matrix, W' - W


class Grouped(NamedTuple):
    """Several edits trained in one forward: consecutive groups of ``sizes`` rows, each
    with its own `Change` (only the trial forward of batched edits reads it)."""

    changes: tuple[Change, ...]
    sizes: tuple[int, ...]


# ---------------------------------------------------------------------- scores and loss
def value_change(acts: torch.Tensor, delta: Change | Grouped) -> torch.Tensor:
    """What a side memory adds to the value projection's output: a (W' - W)^T for inputs
    (..., I) and delta (O, I) or its `Factors`, in float32: (..., O). Computed as
    delta @ a^T, the order CPU kernels run faster with few rows (one prompt, one decoded
    token). `Grouped`: each group of rows of ``acts`` (B, T, I) with its own change."""
    if isinstance(delta, Grouped):
        parts = acts.split(list(delta.sizes))
        return torch.cat([value_change(a, d) for a, d in zip(parts, delta.changes)])
    flat = acts.float().reshape(-1, acts.shape[-1])
    if isinstance(delta, Factors):
        out = delta.up.float() @ (delta.down.float() @ flat.t())
    else:
        out = delta.float() @ flat.t()
    return out.t().reshape(*acts.shape[:-1], out.shape[0])


def sequence_scores(acts: torch.Tensor, delta: Change, mask: torch.Tensor) -> torch.Tensor:
    """Activation score per sequence: mean over its own non-pad tokens of ||a_t (W' - W)||.

    acts: (B, T, I) inputs of the value matrix; delta: W' - W (`Change`); mask: (B, T), 1 for
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


def mean_inputs(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean value-matrix input over its masked tokens, its key:
    (B, T, I) -> (B, I)."""
    weights = mask.to(acts.dtype).unsqueeze(-1)  # (B, T, 1)
    return (acts * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# ---------------------------------------------------------------------- the key index
class KeyIndex(NamedTuple):
    """Every memory's edit keys joined and normalised once: rebuilt only when a memory's
    ``keys`` tensor is replaced (identity is a safe test: keys are never changed in
    place), since joining hundreds of memories' keys on every forward is not free."""

    sources: list[torch.Tensor]  # each memory's ``keys`` when the index was built
    keys: torch.Tensor  # (E, I)
    unit: torch.Tensor  # (E, I), rows of unit length
    owners: torch.Tensor  # (E,) the memory holding each edit

    @classmethod
    def current(
        cls, keys: Sequence[torch.Tensor], device: torch.device, kept: KeyIndex | None
    ) -> KeyIndex:
        """The index of the memories' ``keys``: ``kept`` if still current, else rebuilt."""
        if (
            kept is not None
            and kept.keys.device == device
            and len(kept.sources) == len(keys)
            and all(old is now for old, now in zip(kept.sources, keys))
        ):
            return kept
        owners = [torch.full((len(k),), i, dtype=torch.long) for i, k in enumerate(keys)]
        joined = torch.cat([k.to(device) for k in keys])
        unit = F.normalize(joined.float(), dim=-1)
        return cls(list(keys), joined, unit, torch.cat(owners).to(device))


def candidates_of(
    acts: torch.Tensor, token_mask: torch.Tensor, index: KeyIndex, k: int, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate memories (B, k'), k' = min(k, E): the memories of its ``k``
    nearest edit keys by cosine, most similar first (may repeat), and those cosines
    (B, k'). With a ``radius`` > 0 a key less similar than that gives -1 (none)."""
    queries = F.normalize(mean_inputs(acts, token_mask).float(), dim=-1)  # (B, I)
    sims, top = (queries @ index.unit.t()).topk(min(k, index.unit.shape[0]), dim=-1)
    picked = index.owners[top]
    if radius > 0:
        picked = torch.where(sims >= radius, picked, torch.full_like(picked, -1))
    return picked, sims


def candidate_scores(candidates: torch.Tensor, score_fn: Scorer) -> torch.Tensor:
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


# ---------------------------------------------------------------------- the decision
def route(
    acts: torch.Tensor,
    token_mask: torch.Tensor,
    memories: Sequence[Any],
    index: KeyIndex,
    *,
    candidates: int,
    radius: float,
    subject_states: torch.Tensor | None = None,
    subject_tau: float = 0.0,
    gate: bool = True,
) -> torch.Tensor:
    """The memory each sequence uses, -1 for the unedited model, by every rule in this
    module's docstring. ``acts`` (B, T, I) are the value matrix's inputs, ``token_mask``
    (B, T) the tokens routing reads, ``memories`` the side memories (their ``scores``,
    ``epsilon`` and ``subject_keys``), ``index`` their keys; ``candidates`` 0 scores every
    memory. ``subject_states`` (B, T, O), centred unit states of the subject layer, turn
    on the subject gate at cosine ``subject_tau``. Memories without edits (all of them
    retracted) hold no key and are never candidates: they answer nothing. ``gate`` False
    is the paper's "w.o. router" ablation (Table 7): no threshold, key radius or subject
    gate, so every sequence takes its top-scoring memory and nothing reaches the unedited
    model once there is one."""
    if not len(memories) or not len(index.keys):
        return torch.full((acts.shape[0],), -1, dtype=torch.long, device=acts.device)
    k = len(index.keys) if dense(candidates, len(memories)) else candidates
    cands, similarity = candidates_of(acts, token_mask, index, k, radius if gate else 0.0)

    def score(memory: int, rows: torch.Tensor) -> torch.Tensor:
        return memories[memory].scores(acts[rows], token_mask[rows])

    thresholds = torch.tensor([m.epsilon for m in memories], device=acts.device)
    if not gate:
        thresholds = torch.full_like(thresholds, float("-inf"))
    choice = top1(cands, candidate_scores(cands, score), thresholds, similarity)
    if gate and subject_states is not None and subject_tau > 0:
        keys = [m.subject_keys for m in memories]
        choice = subject_gate(choice, subject_states, token_mask, keys, subject_tau)
    return choice


def dense(candidates: int, memories: int) -> bool:
    """Whether every memory is scored (no index, or no more memories than candidates)."""
    return not candidates or memories <= candidates


def top1(
    candidates: torch.Tensor,
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    similarity: torch.Tensor,
) -> torch.Tensor:
    """Algorithm 2 among each row's ``candidates`` (B, k) with their ``scores`` (B, k):
    the top scorer (ties to the lower memory index) if it clears its own threshold.

    One exception (rule 4), given the candidates' key cosines ``similarity`` (B, k): when
    the row's key is an edit's own (>= `VERBATIM`), that edit's memory answers if its
    score clears its own threshold, rather than the top scorer, and also where the top
    scorer does not clear its own. Scores of different memories are not on one scale:
    with many memories an edit prompt is often cleared by its own memory and outscored by
    a neighbour trained on a similar prompt, which may not clear. Only rows that repeat an
    edit's prompt are affected, so locality is not."""
    held = candidates >= 0
    best = scores.max(dim=1).values  # (B,)
    above_all = torch.iinfo(torch.long).max  # never the lowest index at the top score
    at_top = held & (scores == best[:, None])
    top = torch.where(at_top, candidates, above_all).min(dim=1).values
    top = top.clamp(max=len(thresholds) - 1)  # rows without candidates: not routed below
    routed = (best > float("-inf")) & (best > thresholds[top])
    clears = held & (scores > thresholds[candidates.clamp(min=0)])
    verbatim = clears & (similarity >= VERBATIM)  # (B, k)
    first = verbatim.to(torch.uint8).argmax(dim=1)  # the most similar such key
    mine = candidates.gather(1, first[:, None]).squeeze(1)
    own = verbatim.any(dim=1)
    answer = torch.where(own, mine, top)
    return torch.where(routed | own, answer, torch.full_like(answer, -1))


def best_scores(
    acts: torch.Tensor,
    token_mask: torch.Tensor,
    memories: Sequence[Any],
    index: KeyIndex,
    candidates: int,
) -> torch.Tensor | None:
    """Each row's best activation score over the memories `route` would score for it,
    whatever the key radius (the paper's Fig. 3); None without memories that hold edits."""
    if not len(memories) or not len(index.keys):
        return None
    if dense(candidates, len(memories)):
        return torch.stack([m.scores(acts, token_mask) for m in memories]).max(dim=0).values
    cands, _ = candidates_of(acts, token_mask, index, candidates, radius=0.0)

    def score(memory: int, rows: torch.Tensor) -> torch.Tensor:
        return memories[memory].scores(acts[rows], token_mask[rows])

    return candidate_scores(cands, score).max(dim=1).values


# ---------------------------------------------------------------------- the subject gate
def subject_end(tokenizer: Any, ids: Sequence[int], subject: str) -> int | None:
    """Position in ``ids`` of the last token of the last occurrence of ``subject`` (as
    the tokenizer spells it after a space or at the start), None if it is not there:
    where an edit's subject key is read."""
    ids = list(ids)
    for variant in (" " + subject.strip(), subject.strip(), " " + subject, subject):
        sub = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if not sub:
            continue
        for start in range(len(ids) - len(sub), -1, -1):
            if ids[start : start + len(sub)] == sub:
                return start + len(sub) - 1
    return None


def centred_unit(states: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """States (..., H) less the neutral mean ``centre`` (H,), scaled to unit length: the
    residual stream shares a few large dimensions across tokens, which would otherwise
    make every two tokens look alike."""
    return F.normalize(states.float() - centre.float().to(states.device), dim=-1)


def subject_gate(
    choice: torch.Tensor,
    states: torch.Tensor,
    token_mask: torch.Tensor,
    memory_keys: Sequence[torch.Tensor],
    tau: float,
) -> torch.Tensor:
    """Rule 5. A memory's activation score is set mostly by a prompt's wording, so it
    fires on the same question about another subject; low in the model a subject's last
    token still carries the subject rather than its sentence. ``choice`` (B,) with every
    row sent back to the unedited model (-1) whose chosen memory has subject keys
    (n_m, H), all non-zero, none within cosine ``tau`` of any of the row's ``states``
    (B, T, H), unit rows, over its ``token_mask`` (B, T) tokens. A memory holding an edit
    without a subject (a zero key) is not gated."""
    out = choice.clone()
    for memory in choice.unique().tolist():
        if memory < 0:
            continue
        keys = memory_keys[memory].to(states.device)
        if len(keys) == 0 or bool((keys.abs().sum(-1) == 0).any()):
            continue  # holds an edit without a subject: ungated
        rows = choice == memory
        sims = states[rows].float() @ keys.float().t()  # (r, T, n_m)
        sims = sims.masked_fill(~token_mask[rows].bool()[..., None], float("-inf"))
        named = sims.amax(dim=(1, 2)) >= tau  # (r,)
        out[rows] = torch.where(named, choice[rows], torch.full_like(choice[rows], -1))
    return out
