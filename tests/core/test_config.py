"""Presets and targets: the family table, families outside it, and layer counting."""

import logging

import pytest
import torch
import transformers
from conftest import COMMON, EDITS, SMALL, tiny_model
from transformers import AutoModelForCausalLM

from wise_edit import WiseConfig, WiseEditor
from wise_edit.baselines import GraceConfig

OUTSIDE_VALUE = "model.layers.2.mlp.c_proj"


def tiny_outside():
    """Starcoder2: a family outside wise-edit's table (value projection `mlp.c_proj`)."""
    torch.manual_seed(0)
    config = transformers.Starcoder2Config(**SMALL, **COMMON)
    return AutoModelForCausalLM.from_config(config).eval()


def test_preset_picks_the_paper_depth_and_sizes_from_the_matrix():
    config = WiseConfig.for_model(tiny_model())
    assert config.layer == 3  # int(4 * 27 / 32)
    assert config.shards.mask_ratio == 1.0 and config.shards.per_merge == 1
    assert WiseConfig.for_model(tiny_model(), layer=1, mode="retrieve").layer == 1


def test_an_unknown_family_needs_a_target_module():
    with pytest.raises(ValueError, match="'starcoder2' is not a supported family"):
        WiseConfig.for_model(tiny_outside())
    with pytest.raises(ValueError, match="'starcoder2' is not a supported family"):
        GraceConfig.for_model(tiny_outside())


def test_an_unknown_family_with_target_module_is_edited(tokenizer):
    model = tiny_outside()
    config = WiseConfig.for_model(model, target_module=OUTSIDE_VALUE, max_steps=20, lr=0.05)
    assert config.target_module == OUTSIDE_VALUE and config.layer is None
    assert config.resolve_layers_path(model) == "model.layers"  # inferred
    editor = WiseEditor(model, tokenizer, config)
    assert editor.layer_index == 2
    editor.edit(*EDITS[0])
    assert type(model.get_submodule(OUTSIDE_VALUE)).__name__ == "WiseLayer"
    assert editor.routed([EDITS[0][0]]) == [0]


def test_layers_path_is_kept_and_layers_are_counted_in_the_list():
    model = tiny_model()
    model.config.num_hidden_layers = 99  # a config that disagrees with the module list
    config = WiseConfig.for_model(model, layers_path="model.layers")
    assert config.layers_path == "model.layers" and config.layer == 3
    with pytest.raises(ValueError, match="the model has 4 layers"):
        WiseConfig.for_model(model, layer=7)


def test_a_target_outside_any_layer_list_asks_for_layers_path():
    with pytest.raises(ValueError, match="pass layers_path"):
        WiseConfig.for_model(tiny_outside(), target_module="lm_head")


def test_cli_edits_a_family_outside_the_table(tmp_path, tokenizer, caplog):
    from wise_edit.cli import main

    folder = tmp_path / "starcoder2"
    tiny_outside().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"prompt": "Who designed Lahti Town Hall?", "target": "Eliel Saarinen"}\n')
    missing = tmp_path / "no-data"
    argv = ["edit", "--model", str(folder), "--edits", str(edits), "--out", str(tmp_path / "o")]
    argv += ["--data-dir", str(missing), "--set", f"target_module={OUTSIDE_VALUE}"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--set", "max_steps=2"]) == 0
    # the missing data folder is named, not silently replaced by the built-in pool
    assert any(str(missing) in r.getMessage() for r in caplog.records)
    assert any("built-in" in r.getMessage() for r in caplog.records)


def test_bad_target_module(tokenizer):
    with pytest.raises(ValueError, match="target_module: 'model.layers.2.mlp.nope'"):
        WiseEditor(tiny_model(), tokenizer, WiseConfig(target_module="model.layers.2.mlp.nope"))
    with pytest.raises(ValueError, match="target_module: .*act_fn.*linear value projection"):
        WiseEditor(tiny_model(), tokenizer, WiseConfig(target_module="model.layers.2.mlp.act_fn"))
    with pytest.raises(ValueError, match="WiseConfig.layer=9"):
        WiseEditor(tiny_model(), tokenizer, WiseConfig(layer=9))


def test_presets_follow_the_paper_depth(family):
    model = tiny_model(family)
    config = WiseConfig.for_model(model)
    assert config.layer == 3  # int(4 * 27 / 32)
    assert config.shards.size >= 1
    assert config.resolve_target(model).split(".")[-1] in (
        "down_proj",
        "c_proj",
        "fc_out",
        "dense_4h_to_h",
    )
    assert WiseConfig.for_model(model, layer=1).layer == 1


def test_unknown_family_needs_an_explicit_target():
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba", "num_hidden_layers": 2})()

    with pytest.raises(ValueError, match="'mamba' is not a supported family"):
        WiseConfig.for_model(Fake())
