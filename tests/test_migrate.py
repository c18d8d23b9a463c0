"""wise_edit.migrate: older saves' configs read as their edits were made, flat setting
names translated, and a format-2 WISE save loaded bit for bit."""

import torch
from conftest import EDITS, as_format_2, fast_config, tiny_model

from wise_edit import WiseConfig, WiseEditor
from wise_edit.core.persistence import read_save
from wise_edit.migrate import FORMAT_VERSION, WISE_RENAMED, canonical_settings, upgrade_config

FLAT = {"mode": "retrieve", "shard_size": 5, "alpha": 0.3, "irrelevant_rows": 8, "lr": 0.1}


def test_flat_names_become_dotted_names():
    assert canonical_settings(WiseConfig, FLAT) == {
        "memory.mode": "retrieve",
        "shards.size": 5,
        "routing.alpha": 0.3,
        "negatives.random": 8,
        "lr": 0.1,
    }


def old(config, *dropped):
    """A format-2 WISE config (flat) of ``config`` without the fields ``dropped``."""
    out = {}
    back = {new: old for old, new in WISE_RENAMED.items()}
    for group, value in config.to_dict().items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for leaf, v in items:
            name = group if leaf is None else back.get(f"{group}.{leaf}")
            if name is not None:  # None: a setting newer than format 2 (memory.rank)
                out[name] = v
    return {k: v for k, v in out.items() if k not in dropped}


def test_fields_older_saves_lack_take_the_value_their_edits_were_made_with():
    made = upgrade_config(
        "WISE",
        old(
            WiseConfig(optimizer="sgd"),
            "optimizer",
            "route_candidates",
            "key_radius",
            "subject_tau",
            "side_steps",
            "rehearse_rows",
            "prompt_format",
            "train_stop",
        ),
        version=2,
    )
    config = WiseConfig.from_dict(made)
    assert config.optimizer == "sgd"  # trained with SGD at its lr
    assert config.routing.candidates == 0 and config.routing.key_radius == 0.0
    assert config.routing.subject_tau == 0.0 and config.side_steps == 0
    assert config.memory.rehearse_rows == 0
    assert (config.prompt_format, config.train_stop) == ("raw", False)
    # a save that has them keeps them; today's saves are read as written
    assert WiseConfig.from_dict(upgrade_config("WISE", old(WiseConfig()), 2)) == WiseConfig()
    current = WiseConfig().to_dict()
    assert upgrade_config("WISE", current, FORMAT_VERSION) is current


def test_removed_fields_of_a_save_are_dropped(caplog):
    flat = {**old(WiseConfig()), "momentum": 0.5, "prefix_top_k": 5}
    assert WiseConfig.from_dict(upgrade_config("WISE", flat, 2)) == WiseConfig()
    assert "momentum=0.5" in caplog.text


def test_a_format_2_save_loads_bit_for_bit_and_keeps_editing_the_same(tokenizer, tmp_path):
    config = fast_config(mode="retrieve", shard_size=1, mask_ratio=0.5, replay=True)
    editor = WiseEditor(tiny_model(), tokenizer, config)
    editor.edit_many(EDITS[:3])
    editor.save_pretrained(tmp_path / "s")
    as_format_2(tmp_path / "s")
    assert read_save(tmp_path / "s").state["format_version"] == 2
    loaded = WiseEditor.from_pretrained(tiny_model(), tokenizer, tmp_path / "s")
    for a, b in zip(editor.memories, loaded.memories):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.keys, b.keys)
        assert a.meta() == b.meta()
    editor.edit(*EDITS[3])
    loaded.edit(*EDITS[3])
    assert torch.equal(editor.memories[-1].delta, loaded.memories[-1].delta)
    loaded.save_pretrained(tmp_path / "s")  # written back in today's format
    assert read_save(tmp_path / "s").state["format_version"] == FORMAT_VERSION
