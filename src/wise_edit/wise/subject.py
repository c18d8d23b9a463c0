"""The subject gate: a side memory answers only sequences that name one of its edits'
subjects.

A memory's activation score is set mostly by a prompt's wording, so on CounterFact it
fires on the same question about another subject (locality probes). Low in the model a
subject's last token still carries the subject rather than its sentence, so each edit is
keyed there (the residual stream after `WiseConfig.subject_layer` decoder layers, centred
on neutral text, at the subject's last token of the edit prompt), and a sequence may keep
the memory routing chose only if one of its tokens lies within cosine
`WiseConfig.subject_tau` of one of that memory's subject keys. Edits given without a
subject (or whose subject is not found in their prompt) have a zero key and leave their
memory ungated. Pure functions; the editor computes the keys, the layer applies the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def subject_end(tokenizer: Any, ids: Sequence[int], subject: str) -> int | None:
    """Position in ``ids`` of the last token of the last occurrence of ``subject`` (as
    the tokenizer spells it after a space or at the start), None if it is not there."""
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
    """``choice`` (B,) with every row sent back to the unedited model (-1) whose chosen
    memory has subject keys (n_m, H), all non-zero, none within cosine ``tau`` of any of
    the row's ``states`` (B, T, H), unit rows, over its ``token_mask`` (B, T) tokens."""
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
