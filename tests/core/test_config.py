"""Presets and targets: the family table, families outside it, and layer counting."""

import logging

import pytest
import torch
import transformers
from conftest import COMMON, EDITS, SMALL, tiny_model
from transformers import AutoModelForCausalLM

from wise_edit import WiseConfig, WiseEditor
from wise_edit.baselines import GraceConfig
from wise_edit.wise.config import MERGE_NAMES
from wise_edit.wise.merging import MERGE_METHODS

OUTSIDE_VALUE = "model.layers.2.mlp.c_proj"


def tiny_outside():
    """Starcoder2: a family outside wise-edit's table (value projection `mlp.c_proj`)."""
    torch.manual_seed(0)
    config = transformers.Starcoder2Config(**SMALL, **COMMON)
    return AutoModelForCausalLM.from_config(config).eval()


def test_preset_picks_the_paper_depth_and_sizes_from_the_matrix():
    config = WiseConfig.for_model(tiny_model())
    assert config.layer == 3  # int(4 * 27 / 32)
    assert config.mask_ratio == 1.0 and config.shards_per_merge == 1
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


def test_merge_names_are_the_registry():
    assert tuple(MERGE_METHODS) == MERGE_NAMES
    with pytest.raises(ValueError, match="merge_method"):
        WiseConfig(merge_method="average")


def test_optimizer_picks_its_learning_rate_and_owns_momentum():
    assert WiseConfig().optimizer == "adam" and WiseConfig().lr == 1e-2
    assert WiseConfig(optimizer="sgd").lr == 1.0 and WiseConfig(lr=0.5).lr == 0.5
    assert WiseConfig(optimizer="sgd", momentum=0.5).momentum == 0.5
    with pytest.raises(ValueError, match="momentum.*optimizer='sgd'"):
        WiseConfig(momentum=0.5)
    with pytest.raises(ValueError, match="optimizer"):
        WiseConfig(optimizer="rmsprop")


def test_each_early_stop_picks_its_bound():
    assert WiseConfig().early_stop_loss == 0.2  # 'answer': the routing margins alone
    assert WiseConfig(early_stop_on="loss").early_stop_loss == 0.05  # the reference's
    assert WiseConfig(early_stop_on="lm").early_stop_loss == 0.05
    assert WiseConfig(early_stop_loss=0.01).early_stop_loss == 0.01
    # a save keeps the bound it was trained with, whatever the default becomes
    saved = {**WiseConfig().to_dict(), "early_stop_loss": 0.05}
    assert WiseConfig.from_dict(saved).early_stop_loss == 0.05
    with pytest.raises(ValueError, match="early_stop_on"):
        WiseConfig(early_stop_on="never")
    with pytest.raises(ValueError, match="side_steps"):
        WiseConfig(side_steps=-1)


def test_side_steps_are_on_by_default_and_off_for_older_saves():
    assert WiseConfig().side_steps == 16
    old = {k: v for k, v in WiseConfig().to_dict().items() if k != "side_steps"}
    assert WiseConfig.from_dict(old).side_steps == 0
    assert WiseConfig.from_dict(WiseConfig().to_dict()).side_steps == 16


def test_the_retrieval_index_is_on_except_for_saves_without_keys():
    assert WiseConfig().route_candidates == 4
    old = {k: v for k, v in WiseConfig().to_dict().items() if k != "route_candidates"}
    assert WiseConfig.from_dict(old).route_candidates == 0
    assert WiseConfig.from_dict(WiseConfig().to_dict()).route_candidates == 4


def test_a_save_from_before_the_optimizer_field_keeps_training_with_sgd():
    old = {k: v for k, v in WiseConfig(optimizer="sgd").to_dict().items() if k != "optimizer"}
    assert WiseConfig.from_dict(old).optimizer == "sgd"
    assert WiseConfig.from_dict(WiseConfig().to_dict()).optimizer == "adam"


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


def test_key_radius_is_calibrated_by_default_a_cosine_and_off_in_older_saves():
    assert WiseConfig().key_radius is None
    old = {k: v for k, v in WiseConfig().to_dict().items() if k != "key_radius"}
    assert WiseConfig.from_dict(old).key_radius == 0.0
    assert WiseConfig.from_dict(WiseConfig().to_dict()).key_radius is None
    assert WiseConfig(key_radius=0.75).key_radius == 0.75
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="key_radius"):
            WiseConfig(key_radius=bad)
