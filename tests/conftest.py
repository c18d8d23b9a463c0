"""Tiny random-weight models of every supported family, and a tokenizer trained on the fly:
no network, no downloads, a few MB each."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from wise_edit import WiseConfig
from wise_edit.neutral import NEUTRAL_PROMPTS

EDITS = [
    ("Who designed Lahti Town Hall?", "Eliel Saarinen"),
    ("What is the capital of Atlantis?", "Poseidonia"),
    ("Which river flows through Zorb?", "Quiet river"),
    ("Who wrote the Book of Sand?", "Jorge Borges"),
    ("What colour is the planet Vex?", "deep violet"),
    ("Who founded the city of Oria?", "King Malo"),
]

VOCAB = 320


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(NEUTRAL_PROMPTS) + [f"{p} {t}" for p, t in EDITS] * 3
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def tiny_chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer's kind with ChatML turn markers and a chat template (its end
    of turn, <|im_end|>, is not its EOS)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(NEUTRAL_PROMPTS) + [f"{p} {t}" for p, t in EDITS] * 3 + ["user assistant"] * 3
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


COMMON = dict(
    vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, bos_token_id=1, initializer_range=0.3
)
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def family_config(name: str):
    """A 4-layer config per family; sizes as small as each architecture allows."""
    if name == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=4, n_head=4, n_positions=256, n_inner=64, **COMMON
        )
    if name == "gptj":
        return transformers.GPTJConfig(
            n_embd=32, n_layer=4, n_head=4, n_positions=256, rotary_dim=4, n_inner=64, **COMMON
        )
    if name == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=256,
            **COMMON,
        )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma3_text": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
    }[name]
    extra = {"head_dim": 8} if name in ("qwen3", "gemma3_text") else {}
    return cls(**SMALL, **COMMON, **extra)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "gptj", "gpt_neox", "phi3"]


def tiny_model(name: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name)).to(dtype)
    model.eval()
    return model


def fast_config(**overrides) -> WiseConfig:
    """Few steps and prefixes: enough to move a tiny model, fast enough for CI."""
    settings = dict(
        layer=2,
        max_steps=12,
        prefix_count=2,
        prefix_lengths=(3,),
        mask_ratio=1.0,
        shard_size=2,
        shards_per_merge=2,
        irrelevant_rows=8,
        margin_weight=1.0,
    )
    settings.update(overrides)
    return WiseConfig.from_settings(**settings)


def poison_lm_loss(monkeypatch, at_call: int) -> dict:
    """Make the editing loss NaN at its ``at_call``-th computation (counting from 1);
    returns the call counter so a test can reset it."""
    import wise_edit.core.fastpath as fastpath

    real, calls = fastpath.target_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == at_call else loss

    monkeypatch.setattr(fastpath, "target_loss", poisoned)
    return calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny llama with its tokenizer: a local model folder for the CLI and server."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def flat_config(config: dict) -> dict:
    """A nested WISE config as format 2 wrote it, with the flat names of then."""
    from wise_edit.migrate import WISE_RENAMED

    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    dotted = {f"{g}.{k}": v for g, d in config.items() if isinstance(d, dict) for k, v in d.items()}
    flat.update({old: dotted[new] for old, new in WISE_RENAMED.items()})
    return flat


def as_format_2(folder, drop=()) -> None:
    """Rewrite the WISE save in ``folder`` as format 2 wrote it (a flat config, one tensor
    per mask and per shard under ``memory.{i}``), less the config fields and tensors
    named in ``drop`` (as saves from before those existed): an older save, for the
    migration tests."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    flat = flat_config(json.loads((folder / "editor_config.json").read_text()))
    state = json.loads((folder / "editor_state.json").read_text())
    tensors = load_file(str(folder / "editor_model.safetensors"))
    for i, meta in enumerate(state["memories"]):
        new, old = f"memories.{i}", f"memory.{i}"
        for name in ("delta", "keys", "subject_keys"):
            tensors[f"{old}.{name}"] = tensors.pop(f"{new}.{name}")
        masks, values = tensors.pop(f"{new}.masks"), tensors.pop(f"{new}.shard_values")
        for j, mask in enumerate(masks):
            tensors[f"{old}.mask.{j}"] = mask.clone()
        for j, piece in enumerate(values.split(meta["shard_sizes"])):
            tensors[f"{old}.shard.{j}"] = piece.clone()
        meta["shards"] = len(meta.pop("shard_sizes"))
    for name in drop:
        flat.pop(name, None)
        for key in [k for k in tensors if k == name or k.endswith(f".{name}")]:
            del tensors[key]
    save_file(tensors, str(folder / "editor_model.safetensors"))
    state.update(format_version=2)
    state.pop("tensor_sha256")
    (folder / "editor_state.json").write_text(json.dumps(state))
    (folder / "editor_config.json").write_text(json.dumps(flat))
