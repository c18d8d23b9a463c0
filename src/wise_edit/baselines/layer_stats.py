"""The second moment of a value matrix's inputs, C = E[k k^T], that ROME, MEMIT and
AlphaEdit weigh their updates by (ROME section 3.1, Eq. 2; MEMIT section 4.3, Eq. 14;
AlphaEdit section 3.2, where its eigenvectors of small eigenvalue span the null space
of preserved knowledge). Named after the reference code's `rome/layer_stats.py`.

C is a property of the unedited model and one layer, so it is measured once from text at
hand and cached under the wise-edit cache folder (`models.default_cache_dir()`), as
``key-stats/<key>.safetensors`` (C and its eigendecomposition, fp64) beside a JSON file
that says what was measured: the model fingerprint, the module, the corpus digest and
the number of tokens read. The key hashes all of these, so a cache is never reused for
another model, layer, corpus or token budget; a cache whose JSON does not match what is
asked for, or whose tensors cannot be read, is measured again.

The corpus is what a machine without a network has: the Hallucination set's Wikipedia
passages and its RedPajama-like locality texts (``hallucination/*.json`` under the data
folder; the edits' new targets are left out, they are not preserved knowledge), or any
text file with one text per line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.fastpath import backbone_inputs
from ..core.rows import left_pad, pad_id
from ..neutral import NEUTRAL_PROMPTS

logger = logging.getLogger(__name__)

STATS_VERSION = 1
NEUTRAL_CORPUS = "neutral"
"""The corpus name of the built-in neutral sentences (a few hundred tokens: enough for
the tiny models of tests, far too little for a real model's C)."""
# texts read per forward while measuring
STATS_BATCH = 8
# each text is cut to this many tokens (the passages here are shorter)
STATS_MAX_LENGTH = 512
# elements hashed per parameter for the model fingerprint (see `model_fingerprint`)
FINGERPRINT_SAMPLES = 4096


@dataclass
class KeyStats:
    """C = E[k k^T] (I, I) of one module's inputs, and its eigendecomposition
    (``eigenvalues`` ascending, ``eigenvectors`` as columns), all fp64."""

    moment: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    tokens: int


def corpus_texts(source: str) -> list[str]:
    """The texts of ``source``: `NEUTRAL_CORPUS`, a data folder (its Hallucination
    passages and locality texts) or a text file with one text per line."""
    if source == NEUTRAL_CORPUS:
        return list(NEUTRAL_PROMPTS)
    path = Path(source).expanduser()
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line]
    files = sorted((path / "hallucination").glob("*.json"))
    if not files:
        raise FileNotFoundError(
            f"no text for the key statistics: {path} is neither a text file nor a data folder "
            "with hallucination/*.json; set stats_corpus to one (or 'neutral' for tests)"
        )
    texts: list[str] = []
    for file in files:
        for record in json.loads(file.read_text(encoding="utf-8")):
            loc = [record.get("locality_prompt"), record.get("locality_ground_truth")]
            passage = record.get("prompt")
            locality = "".join(t for t in loc if isinstance(t, str))  # one text cut in two
            texts += [t for t in (passage, locality) if isinstance(t, str) and t.strip()]
    return texts


def model_fingerprint(model: nn.Module) -> str:
    """A sha256 over every parameter's shape and a strided sample of its values (at most
    `FINGERPRINT_SAMPLES` each), in order: cheap on a large model, and any training or a
    different checkpoint changes it. A wrapper attached by an editor keeps the original
    as ``base_layer`` and its changes in buffers, so the fingerprint is the unedited
    model's."""
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for param in model.parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        digest.update(str(tuple(param.shape)).encode())
        digest.update(flat[::step].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def texts_digest(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode("utf-8", "surrogatepass")).hexdigest()


@torch.no_grad()
def measure_moment(
    model: nn.Module,
    tokenizer: Any,
    module: nn.Module,
    texts: Sequence[str],
    max_tokens: int,
    progress: bool = True,
) -> tuple[torch.Tensor, int]:
    """E[k k^T] (I, I, fp64) of ``module``'s inputs over the real tokens of ``texts``, read
    until ``max_tokens`` tokens; returns it and the number of tokens read. The forward
    stops at ``module``: nothing above it is computed."""
    total: torch.Tensor | None = None
    count = 0
    device = next(model.parameters()).device
    bar = tqdm(total=max_tokens, desc="key statistics", unit="tok", disable=not progress)
    for start in range(0, len(texts), STATS_BATCH):
        if count >= max_tokens:
            break
        seqs = [
            tokenizer(t)["input_ids"][:STATS_MAX_LENGTH] for t in texts[start : start + STATS_BATCH]
        ]
        ids, mask = left_pad([s for s in seqs if s], pad_id(tokenizer))
        keys = _module_inputs(model, module, ids.to(device), mask.to(device))  # (B, T, I)
        keys = keys[mask.to(device).bool()].double()[: max_tokens - count]  # (N, I)
        total = keys.t() @ keys if total is None else total + keys.t() @ keys
        count += len(keys)
        bar.update(len(keys))
    bar.close()
    if total is None or count == 0:
        raise ValueError("the corpus for the key statistics has no tokens")
    return total.cpu() / count, count


class _Stop(Exception):
    pass


def _module_inputs(
    model: nn.Module, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    found: dict[str, torch.Tensor] = {}

    def grab(_module: nn.Module, args: tuple[Any, ...]) -> None:
        found["x"] = args[0].detach()
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    try:
        model.base_model(**backbone_inputs(ids, mask))
    except _Stop:
        pass
    finally:
        handle.remove()
    return found["x"]


def eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric ``moment``; C is positive
    semi-definite, so these are its singular values and vectors (the SVD AlphaEdit's
    reference code takes)."""
    values, vectors = torch.linalg.eigh(moment.double())
    return values, vectors


def cache_root() -> Path:
    from ..models import default_cache_dir

    return default_cache_dir() / "key-stats"


def load_or_measure(
    model: nn.Module,
    tokenizer: Any,
    module: nn.Module,
    module_path: str,
    corpus: str,
    max_tokens: int,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> KeyStats:
    """The cached statistics of ``module`` (at ``module_path`` of ``model``) over
    ``corpus``, measured and cached first when there is no matching cache."""
    texts = corpus_texts(corpus)
    meta = {
        "format_version": STATS_VERSION,
        "model_fingerprint": fingerprint or model_fingerprint(model),
        "module": module_path,
        "corpus_sha256": texts_digest(texts),
        "max_tokens": max_tokens,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    cached = _read_cache(root / key, meta)
    if cached is not None:
        return cached
    logger.info(
        "measuring key statistics of %s over %s (%d tokens at most)",
        module_path,
        corpus,
        max_tokens,
    )
    moment, tokens = measure_moment(model, tokenizer, module, texts, max_tokens)
    values, vectors = eigen(moment)
    stats = KeyStats(moment, values, vectors, tokens)
    _write_cache(root / key, {**meta, "corpus": corpus, "tokens": tokens}, stats)
    return stats


def _read_cache(stem: Path, meta: dict[str, Any]) -> KeyStats | None:
    """The cache at ``stem`` if its JSON records exactly ``meta`` and its tensors load."""
    try:
        recorded = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
        if any(recorded.get(k) != v for k, v in meta.items()):
            logger.warning("key statistics at %s are for something else; measuring again", stem)
            return None
        tensors = load_file(str(stem.with_suffix(".safetensors")))
        return KeyStats(
            tensors["moment"],
            tensors["eigenvalues"],
            tensors["eigenvectors"],
            int(recorded["tokens"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        logger.warning("key statistics at %s unreadable (%s); measuring again", stem, err)
        return None


def _write_cache(stem: Path, meta: dict[str, Any], stats: KeyStats) -> None:
    """Tensors first, then the JSON, each by an atomic rename: a reader that finds the
    JSON finds the tensors it describes."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "moment": stats.moment,
        "eigenvalues": stats.eigenvalues,
        "eigenvectors": stats.eigenvectors,
    }
    for suffix, write in (
        (".safetensors", lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, p)),
        (".json", lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True))),
    ):
        fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}", suffix=suffix)
        os.close(fd)
        write(tmp)
        Path(tmp).chmod(0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, stem.with_suffix(suffix))
