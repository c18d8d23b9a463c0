"""Editors of every method (WISE in both modes and the baselines) set up to move a tiny
random model in a few steps (the real defaults are the paper's), and helpers to compare
their state and outputs."""

import atexit
import copy
import shutil
import tempfile

import torch
from conftest import fast_config, tiny_model, tiny_tokenizer

from wise_edit import WiseEditor
from wise_edit.baselines import (
    AlphaEditConfig,
    AlphaEditEditor,
    DeferConfig,
    DeferEditor,
    FTEWCConfig,
    FTEWCEditor,
    FTLConfig,
    FTLEditor,
    GraceConfig,
    GraceEditor,
    MEMITConfig,
    MEMITEditor,
    MEMITMassConfig,
    MEMITMassEditor,
    MendConfig,
    MendEditor,
    ROMEConfig,
    ROMEEditor,
)
from wise_edit.core.rows import target_ids
from wise_edit.metrics import target_logits


def _baseline(config_class, **settings):
    def build(**overrides):
        config = config_class(**settings)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    return build


def _wise(**settings):
    return lambda **overrides: fast_config(**{**settings, **overrides})


# the key statistics of the tiny models: one temporary cache for the test session
STATS_DIR = tempfile.mkdtemp(prefix="wise-edit-key-stats-")
atexit.register(shutil.rmtree, STATS_DIR, True)
# ROME, MEMIT, AlphaEdit: C from the built-in sentences (enough for 64 inputs), two short
# prefixes, a two-layer range ending at layer 2; a tiny model's keys are far larger than
# a trained model's against MEMIT's lambda and AlphaEdit's absolute threshold
LOCATE = dict(
    layer=2,
    stats_corpus="neutral",
    stats_dir=STATS_DIR,
    context_count=2,
    context_lengths=(3,),
    max_steps=10,
    lr=0.5,
)
SPAN = dict(LOCATE, span=2)

# settings that move a tiny random model in a few steps (the real defaults are the paper's)
SETUPS = {
    "wise-merge": (WiseEditor, _wise(max_steps=30, lr=0.05)),
    "wise-retrieve": (
        WiseEditor,
        _wise(mode="retrieve", shard_size=1, shards_per_merge=2, max_steps=30, lr=0.05),
    ),
    "wise-compact": (
        WiseEditor,
        _wise(
            mode="retrieve",
            shard_size=2,
            shards_per_merge=1,
            max_steps=30,
            lr=0.05,
            # a tiny random model needs entries beyond the bound, which a product keeps
            # by shortening the whole edit
            **{"memory.rank": 8, "memory.norm_bound": None},
        ),
    ),
    "ft-l": (FTLEditor, _baseline(FTLConfig, layer=2, lr=1e-2, max_steps=20)),
    "ft-ewc": (FTEWCEditor, _baseline(FTEWCConfig, layer=2, max_steps=20, replay=2)),
    "grace": (GraceEditor, _baseline(GraceConfig, layer=2, max_steps=20)),
    "defer": (DeferEditor, _baseline(DeferConfig, layer=2, lr=1e-2, max_steps=20)),
    # the untrained (identity) editor network: one plain gradient step of size lr
    "mend": (MendEditor, _baseline(MendConfig, layer=2, lr=10.0, network="identity")),
    "rome": (ROMEEditor, _baseline(ROMEConfig, **LOCATE)),
    "memit": (MEMITEditor, _baseline(MEMITConfig, moment_weight=1.0, **SPAN)),
    "memit-mass": (MEMITMassEditor, _baseline(MEMITMassConfig, moment_weight=1.0, **SPAN)),
    "alphaedit": (AlphaEditEditor, _baseline(AlphaEditConfig, nullspace_threshold=2.0, **SPAN)),
}
UNRELATED = "The weather today is mild and calm."


def make(name, family="llama", seed=0, **overrides):
    """The ``name`` editor (a key of `SETUPS`) on a tiny ``family`` model."""
    cls, config = SETUPS[name]
    return cls(tiny_model(family, seed=seed), _tok(), config(**overrides))


def _tok():
    return tiny_tokenizer()


def first_token_nll(editor, prompt, target):
    tok = editor.tokenizer
    ids = target_ids(tok, target)
    logits = target_logits(editor.model, tok(prompt)["input_ids"], ids)
    return -torch.log_softmax(logits[0].float(), -1)[ids[0]].item()


def state(editor):
    tensors = {k: v.clone() for k, v in editor._tensors().items()}
    return copy.deepcopy(editor.edit_log), copy.deepcopy(editor._state()), tensors


def same_state(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def layer_io(editor, batch):
    """The wrapped layer's input and output in one forward of ``batch``."""
    seen = {}
    handle = editor.layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], out=out))
    with torch.no_grad():
        editor.model(**batch)
    handle.remove()
    return seen["x"], seen["out"]


def logits_of(model, tokenizer, prompt):
    with torch.no_grad():
        return model(**tokenizer([prompt], return_tensors="pt")).logits


def greedy(editor, tokenizer, prompt: str, tokens: int = 6) -> list[int]:
    """The editor's greedy continuation of ``prompt`` (token ids)."""
    batch = tokenizer([prompt], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=tokens, do_sample=False)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def unedited(tokenizer, prompt: str, tokens: int = 6) -> list[int]:
    """The same continuation from a fresh, never edited tiny model."""
    model = tiny_model()
    batch = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, batch["input_ids"].shape[1] :].tolist()
