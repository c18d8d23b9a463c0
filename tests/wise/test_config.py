"""`WiseConfig`: each setting checked and named when wrong, nested by idea, the
matrix-size presets."""

import pytest
from conftest import tiny_model

from wise_edit import WiseConfig
from wise_edit.wise.config import MERGE_NAMES, RoutingConfig
from wise_edit.wise.merging import MERGE_METHODS


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"shards.mask_ratio": 0.0}, "ShardConfig.mask_ratio"),
        ({"shards.mask_ratio": 1.5}, "ShardConfig.mask_ratio"),
        ({"memory.mode": "both"}, "MemoryConfig.mode"),
        ({"shards.merge_method": "average"}, "ShardConfig.merge_method"),
        ({"routing.beta": 0.1, "routing.alpha": 0.2}, "RoutingConfig.beta"),
        ({"routing.threshold_ratio": 0}, "RoutingConfig.threshold_ratio"),
        ({"shards.size": 0}, "ShardConfig.size"),
        ({"memory.norm_bound": -1.0}, "MemoryConfig.norm_bound"),
        ({"memory.replay": True, "memory.mode": "merge"}, "MemoryConfig.replay"),
        ({"negatives.random": 0}, "NegativesConfig.random"),
        ({"prefixes.lengths": [0]}, "PrefixConfig.lengths"),
        ({"max_steps": 0}, "WiseConfig.max_steps"),
    ],
)
def test_invalid_config_names_the_setting(settings, name):
    with pytest.raises(ValueError, match=f"{name}="):
        WiseConfig.from_settings(**settings)


def test_groups_take_objects_dicts_and_dotted_names_alike():
    by_object = WiseConfig(routing=RoutingConfig(alpha=0.3))
    by_dict = WiseConfig.from_dict({"routing": {"alpha": 0.3}})
    by_name = WiseConfig.from_settings(**{"routing.alpha": 0.3})
    assert by_object == by_dict == by_name and by_name.routing.alpha == 0.3
    assert WiseConfig.from_dict(by_name.to_dict()) == by_name
    with pytest.raises(ValueError, match="unknown RoutingConfig fields"):
        WiseConfig.from_dict({"routing": {"alpah": 0.3}})
    with pytest.raises(ValueError, match="unknown WiseConfig setting 'routing.alpah'"):
        WiseConfig.from_settings(**{"routing.alpah": 0.3})


def test_setting_names_list_every_leaf_once():
    names = WiseConfig.setting_names()
    assert len(names) == len(set(names)) == 41
    assert "routing.alpha" in names and "shards.size" in names and "lr" in names


def test_the_preset_is_retrieve_with_one_compact_memory_per_edit():
    from wise_edit.wise import preset_for_matrix

    expected = {
        "memory.mode": "retrieve",
        "memory.replay": True,
        "memory.rank": 8,
        "memory.norm_bound": None,
        "routing.threshold_ratio": 0.8,
        "prefixes.per_step": 1,
        "shards.mask_ratio": 1.0,
        "shards.per_merge": 1,
        "shards.merge_density": 1.0,
        "shards.size": 1,
    }
    assert preset_for_matrix(11008 * 4096) == preset_for_matrix(1536 * 576) == expected
    dense = preset_for_matrix(11008 * 4096, compact=False)
    assert dense["shards.mask_ratio"] == 0.2 and dense["shards.size"] == 5
    compact_only = {
        "memory.rank",
        "memory.norm_bound",
        "routing.threshold_ratio",
        "prefixes.per_step",
    }
    assert not compact_only & set(dense)
    assert preset_for_matrix(1536 * 576, compact=False)["shards.mask_ratio"] == 1.0
    assert preset_for_matrix(4 * 11008 * 4096, compact=False)["shards.mask_ratio"] == 0.05
    # settings only dense memories have bring the dense preset, not an error
    masked = WiseConfig.for_model(tiny_model(), **{"shards.mask_ratio": 0.5})
    assert masked.memory.rank == 0 and masked.memory.norm_bound == 1.0
    assert masked.edits_per_memory() == 5
    assert WiseConfig.for_model(tiny_model(), **{"memory.rank": 0}).shards.size == 5
    config = WiseConfig.for_model(tiny_model())
    assert config.memory.mode == "retrieve" and config.edits_per_memory() == 1
    assert config.memory.rank == 8
    assert config.prefixes.per_step == 1
    assert WiseConfig().memory.mode == "merge" and WiseConfig().memory.rank == 0  # the paper's
    assert WiseConfig().prefixes.per_step is None  # every prefix at every step


def test_overrides_win_over_presets_in_any_naming():
    model = tiny_model()
    config = WiseConfig.for_model(model, mask_ratio=0.3, shard_size=7, mode="retrieve")
    assert (config.shards.mask_ratio, config.shards.size, config.memory.mode) == (
        0.3,
        7,
        "retrieve",
    )
    dotted = {"shards.mask_ratio": 0.3, "shards.size": 7, "memory.mode": "retrieve"}
    assert WiseConfig.for_model(model, **dotted) == config


def test_merge_names_are_the_registry():
    assert tuple(MERGE_METHODS) == MERGE_NAMES
    with pytest.raises(ValueError, match="merge_method"):
        WiseConfig.from_settings(**{"shards.merge_method": "average"})


def test_optimizer_picks_its_learning_rate():
    assert WiseConfig().optimizer == "adam" and WiseConfig().lr == 1e-2
    assert WiseConfig(optimizer="sgd").lr == 1.0 and WiseConfig(lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="optimizer"):
        WiseConfig(optimizer="rmsprop")


def test_removed_settings_are_refused_unless_given_what_the_code_does():
    with pytest.raises(ValueError, match="momentum was removed"):
        WiseConfig.from_settings(momentum=0.5)
    with pytest.raises(ValueError, match="subject_negatives was removed"):
        WiseConfig.from_settings(subject_negatives=2)
    assert WiseConfig.from_settings(momentum=0.0, prefix_top_k=5) == WiseConfig()


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


def test_key_radius_is_calibrated_by_default_and_a_cosine():
    assert WiseConfig().routing.key_radius is None
    assert RoutingConfig(key_radius=0.75).key_radius == 0.75
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="key_radius"):
            RoutingConfig(key_radius=bad)


def test_prefixes_longer_than_the_context_are_refused_before_anything_runs(tokenizer):
    from wise_edit import WiseEditor
    from wise_edit.core.layer import AttachedLayer

    model = tiny_model()  # a context of 256 tokens
    config = WiseConfig.from_settings(layer=2, **{"prefixes.lengths": [100000]})
    with pytest.raises(ValueError, match="prefixes.lengths: 100000 tokens do not fit"):
        WiseEditor(model, tokenizer, config)
    assert not any(isinstance(m, AttachedLayer) for m in model.modules())
