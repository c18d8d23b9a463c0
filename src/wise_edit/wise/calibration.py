"""What WISE measures once per model before the first edit, in one explicit step:
the unit of the margin loss's constants, the key radius, the augmentation prefixes and
the subject gate's centre. Each is measured on the unedited model (neutral text or its
own samples), saved with the edits, and never re-measured for a loaded save."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..core.attach import editing_mode
from ..core.rows import SEED_WORDS, pad_id
from ..neutral import NEUTRAL_PROMPTS
from .router import mean_inputs

# the calibrated key radius: this quantile of the cosines between the keys of pairs of
# neutral sentences (1% of such pairs lie nearer than it)
RADIUS_QUANTILE = 0.99
# the subject gate's key: the residual stream after this many decoder layers, unless the
# config names it; low, so that a subject's last token still carries the subject
DEFAULT_SUBJECT_LAYER = 2
# top-k sampling of the augmentation prefixes (the reference code's 5)
PREFIX_TOP_K = 5


@dataclass
class Calibration:
    """The per-model measurements (None: not measured yet)."""

    score_scale: float | None = None
    key_radius: float | None = None
    prefixes: list[str] | None = None
    subject_centre: torch.Tensor | None = field(default=None, repr=False)


def score_unit(outputs: torch.Tensor, token_mask: torch.Tensor) -> float:
    """The unit of alpha/beta/gamma for a model: median over sequences of the mean norm
    of the value projection's output (B, T, O) on neutral text. The paper's constants
    assume a 7B model's activation scale; in this unit they mean the same on any model."""
    per_token = torch.linalg.vector_norm(outputs.float(), dim=-1)  # (B, T)
    per_seq = (per_token * token_mask).sum(-1) / token_mask.sum(-1)
    return float(per_seq.median())


def background_radius(keys: torch.Tensor, quantile: float = RADIUS_QUANTILE) -> float:
    """The ``quantile`` of the cosine between the keys (N, I) of every pair of unrelated
    sentences: how near two texts about nothing in common come on this model and layer.
    Cosines of mean activations are far from 0 and differ from model to model, so a key
    radius is set against this background rather than as one constant for all models."""
    if len(keys) < 2:
        raise ValueError("a background needs the keys of at least two unrelated prompts")
    unit = F.normalize(keys.float(), dim=-1)
    sims = unit @ unit.t()
    upper = torch.triu_indices(len(keys), len(keys), offset=1, device=sims.device)
    value = float(torch.quantile(sims[upper[0], upper[1]], quantile))
    return min(1.0, max(0.0, value))  # rounding can take a cosine past 1


def subject_centre(states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The subject layer's mean state (H,) over neutral text's routed tokens (B, T, H)."""
    weights = token_mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum((0, 1)).float() / weights.sum()


@torch.no_grad()
def generate_prefixes(
    generate: Callable[..., torch.Tensor],
    tokenizer: object,
    device: torch.device,
    count: int,
    lengths: tuple[int, ...],
    seed: int,
) -> list[str]:
    """Short continuations of seed words sampled by the unedited model's ``generate``
    with ``seed`` (the paper's augmentation), without touching the global RNG."""
    devices = [device] if device.type == "cuda" else []
    prefixes = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(count):
            word, length = SEED_WORDS[i % len(SEED_WORDS)], lengths[i % len(lengths)]
            ids = tokenizer(word, return_tensors="pt").to(device)  # type: ignore[operator]
            out = generate(
                **ids,
                do_sample=True,
                top_k=PREFIX_TOP_K,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad_id(tokenizer),
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)  # type: ignore[attr-defined]
            prefixes.append(" ".join(text.replace("{", " ").replace("}", " ").split()))
    return prefixes


@torch.no_grad()
def calibrate(editor: Any, known: Calibration, subjects: Any) -> Calibration:
    """What ``known`` (a save's calibration, or nothing) lacks, measured on ``editor``'s
    unedited model; what its config fixes wins. ``subjects``: the editor's subject keys
    (`subject.py`), None without the gate. Neutral text rather than the unrelated pool:
    a pool drawn from the edited set shares its sentence forms, and would set the radius
    by the data, not the model."""
    cfg, out = editor.config, Calibration(**vars(known))
    if cfg.routing.score_scale is not None:
        out.score_scale = cfg.routing.score_scale
    if cfg.routing.key_radius is not None:
        out.key_radius = cfg.routing.key_radius
    with editing_mode(editor.model):
        if out.score_scale is None or out.key_radius is None:
            acts, mask = editor._prompt_batch_acts(list(NEUTRAL_PROMPTS))
            if out.score_scale is None:
                out.score_scale = score_unit(editor.layer.base_layer(acts), mask)
            if out.key_radius is None:
                out.key_radius = background_radius(mean_inputs(acts, mask))
        if out.prefixes is None:
            with editor.layer.disabled():
                prefixes = cfg.prefixes
                out.prefixes = generate_prefixes(
                    editor.model.generate,
                    editor.tokenizer,
                    editor.device,
                    prefixes.count,
                    prefixes.lengths,
                    cfg.seed,
                )
        if subjects is not None and out.subject_centre is None:
            out.subject_centre = subjects.centre()
    if out.subject_centre is not None:
        out.subject_centre = out.subject_centre.float().to(editor.device)
    return out
