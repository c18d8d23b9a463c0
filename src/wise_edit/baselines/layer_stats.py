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
from collections.abc import Mapping, Sequence
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
def measure_moments(
    model: nn.Module,
    tokenizer: Any,
    modules: Sequence[nn.Module],
    texts: Sequence[str],
    max_tokens: int,
    progress: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """E[k k^T] (I, I, fp64) of each of ``modules``' inputs over the real tokens of
    ``texts``, read until ``max_tokens`` tokens; returns them and the number of tokens
    read. One forward serves every module (MEMIT's five layers cost one pass, not five),
    and it stops once the last of them has its input: nothing above is computed."""
    if not modules:
        raise ValueError("no module to measure key statistics of")
    totals: list[torch.Tensor | None] = [None] * len(modules)
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
        real = mask.to(device).bool()
        inputs = _module_inputs(model, modules, ids.to(device), mask.to(device))
        taken = 0
        for i, acts in enumerate(inputs):  # (B, T, I) each
            keys = acts[real].double()[: max_tokens - count]  # (N, I)
            outer = keys.t() @ keys
            totals[i] = outer if totals[i] is None else totals[i] + outer
            taken = len(keys)
        count += taken
        bar.update(taken)
    bar.close()
    if count == 0:
        raise ValueError("the corpus for the key statistics has no tokens")
    return [total.cpu() / count for total in totals if total is not None], count


class _Stop(Exception):
    pass


def _module_inputs(
    model: nn.Module, modules: Sequence[nn.Module], ids: torch.Tensor, mask: torch.Tensor
) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            found[i] = args[0].detach()
            if len(found) == len(modules):
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(grab(i)) for i, m in enumerate(modules)]
    try:
        model.base_model(**backbone_inputs(ids, mask))
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [found[i] for i in range(len(modules))]


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
    modules: Mapping[str, nn.Module],
    corpus: str,
    max_tokens: int,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, KeyStats]:
    """The cached statistics of each of ``modules`` (module path in ``model`` -> module)
    over ``corpus``; those without a matching cache are measured together, in one pass
    over the corpus, and cached first."""
    texts = corpus_texts(corpus)
    fingerprint = fingerprint or model_fingerprint(model)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    metas = {
        path: {
            "format_version": STATS_VERSION,
            "model_fingerprint": fingerprint,
            "module": path,
            "corpus_sha256": texts_digest(texts),
            "max_tokens": max_tokens,
        }
        for path in modules
    }
    stems = {
        path: root / hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
        for path, meta in metas.items()
    }
    found = {path: _read_cache(stems[path], metas[path]) for path in modules}
    missing = [path for path, stats in found.items() if stats is None]
    if missing:
        logger.info(
            "measuring key statistics of %s over %s (%d tokens at most)",
            ", ".join(missing),
            corpus,
            max_tokens,
        )
        moments, tokens = measure_moments(
            model, tokenizer, [modules[p] for p in missing], texts, max_tokens
        )
        for path, moment in zip(missing, moments):
            values, vectors = eigen(moment)
            found[path] = KeyStats(moment, values, vectors, tokens)
            meta = {**metas[path], "corpus": corpus, "tokens": tokens}
            _write_cache(stems[path], meta, found[path])
    return {path: stats for path, stats in found.items() if stats is not None}


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
