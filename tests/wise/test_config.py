"""`WiseConfig`: each field checked and named when wrong, the matrix-size presets, and the
defaults older saves keep."""

import pytest
from conftest import tiny_model

from wise_edit import WiseConfig
from wise_edit.wise.config import MERGE_NAMES
from wise_edit.wise.merging import MERGE_METHODS


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"mode": "both"}, "mode"),
        ({"merge_method": "average"}, "merge_method"),
        ({"beta": 0.1, "alpha": 0.2}, "beta"),
        ({"threshold_ratio": 0}, "threshold_ratio"),
        ({"shard_size": 0}, "shard_size"),
        ({"norm_bound": -1.0}, "norm_bound"),
        ({"replay": True, "mode": "merge"}, "replay"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"WiseConfig.{field}="):
        WiseConfig(**kwargs)


def test_matrix_size_presets():
    from wise_edit.wise import preset_for_matrix

    seven_b = preset_for_matrix(11008 * 4096)
    assert seven_b == {
        "mask_ratio": 0.2,
        "shards_per_merge": 2,
        "merge_density": 0.53,
        "shard_size": 500,
    }
    smol = preset_for_matrix(1536 * 576)
    assert smol == {
        "mask_ratio": 1.0,
        "shards_per_merge": 1,
        "merge_density": 1.0,
        "shard_size": 49,
    }
    assert preset_for_matrix(4 * 11008 * 4096)["mask_ratio"] == 0.05


def test_overrides_win_over_presets():
    config = WiseConfig.for_model(tiny_model(), mask_ratio=0.3, shard_size=7, mode="retrieve")
    assert (config.mask_ratio, config.shard_size, config.mode) == (0.3, 7, "retrieve")


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


def test_key_radius_is_calibrated_by_default_a_cosine_and_off_in_older_saves():
    assert WiseConfig().key_radius is None
    old = {k: v for k, v in WiseConfig().to_dict().items() if k != "key_radius"}
    assert WiseConfig.from_dict(old).key_radius == 0.0
    assert WiseConfig.from_dict(WiseConfig().to_dict()).key_radius is None
    assert WiseConfig(key_radius=0.75).key_radius == 0.75
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="key_radius"):
            WiseConfig(key_radius=bad)
