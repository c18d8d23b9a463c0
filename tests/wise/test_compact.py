"""Compact side memories (``memory.rank`` > 0): each edit a trained rank-r product, kept
as factors. Save/load, retraction and the rest of the contract run on the compact setup
in tests/core/test_editor_contract.py; here, the math and what the memory keeps."""

import pytest
import torch
from conftest import EDITS
from editors import make

from wise_edit import WiseConfig, WiseEditor
from wise_edit.core.persistence import CONFIG_FILE, TENSOR_FILE
from wise_edit.wise.compact import bounded_scale, initial_factors
from wise_edit.wise.router import Factors, sequence_scores, value_change


def test_factors_act_as_their_product():
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(5, 3, generator=gen), torch.randn(3, 7, generator=gen)
    acts = torch.randn(2, 4, 7, generator=gen)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    factors = Factors(up, down)
    torch.testing.assert_close(value_change(acts, factors), value_change(acts, up @ down))
    torch.testing.assert_close(
        sequence_scores(acts, factors, mask), sequence_scores(acts, up @ down, mask)
    )


def test_initial_factors_start_at_zero_on_the_tokens_own_directions():
    gen = torch.Generator().manual_seed(1)
    # tokens in a 2-dimensional subspace of a 6-dimensional input space, around a centre
    # every input shares
    basis = torch.linalg.qr(torch.randn(6, 2, generator=gen))[0].t()
    centre = 5.0 * torch.randn(6, generator=gen)
    tokens = torch.randn(10, 2, generator=gen) @ basis + centre
    up, down = initial_factors(tokens, out_dim=4, rank=3, centre=centre)
    assert up.shape == (4, 3) and torch.equal(up, torch.zeros(4, 3))
    # orthogonal rows of norm sqrt(I / r)
    torch.testing.assert_close(down @ down.t(), 2.0 * torch.eye(3), atol=1e-5, rtol=0)
    # the first two span the tokens' subspace, not the shared centre
    projected = down[:2] @ basis.t() / 2**0.5
    torch.testing.assert_close(projected.det().abs(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_fewer_tokens_than_the_rank_pad_with_random_rows():
    tokens = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    up, down = initial_factors(tokens, out_dim=2, rank=2)
    assert down.shape == (2, 4)
    torch.testing.assert_close(down.norm(dim=1), torch.full((2,), 2**0.5))
    torch.testing.assert_close(down[0].abs(), torch.tensor([2**0.5, 0.0, 0.0, 0.0]))


def test_bounded_scale_is_the_largest_step_within_the_bound():
    base = torch.tensor([[0.5, -0.9, 0.0]])
    step = torch.tensor([[1.0, -1.0, 0.0]])
    # entry 0 may move 0.5 up, entry 1 only 0.1 down: s = 0.1
    assert bounded_scale(base, step, 1.0) == pytest.approx(0.1)
    assert bounded_scale(base, step, None) == 1.0
    assert bounded_scale(base, torch.zeros_like(step), 1.0) == 1.0
    assert bounded_scale(base, 0.01 * step, 1.0) == 1.0  # already inside
    assert bounded_scale(base, -step, 1.0) == pytest.approx(1.0)  # moving away from it
    scaled = base + bounded_scale(base, step, 1.0) * step
    assert scaled.abs().max() <= 1.0 + 1e-6


def test_a_compact_memory_keeps_factors_only_and_closes_when_full():
    editor = make("wise-compact", **{"memory.norm_bound": 0.05})
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    first, second = editor.memories
    names = set(dict(first.named_buffers()))
    assert names == {"up", "down", "keys", "subject_keys"}
    out_dim, in_dim = editor.layer.weight.shape
    assert first.up.shape == (out_dim, 2 * 8) and first.down.shape == (2 * 8, in_dim)
    assert first.closed and first.edit_ids == (0, 1) and not second.closed
    assert second.up.shape == (out_dim, 8)
    for memory in editor.memories:  # the norm bound holds for the product
        assert memory.change.dense().abs().max() <= 0.05 + 1e-6


def test_a_compact_save_holds_no_dense_matrix(tmp_path):
    compact, dense = make("wise-compact"), make("wise-retrieve", shard_size=2, shards_per_merge=1)
    for editor, name in ((compact, "compact"), (dense, "dense")):
        for prompt, target in EDITS[:2]:
            editor.edit(prompt, target)
        editor.save_pretrained(tmp_path / name)
    size = {n: (tmp_path / n / TENSOR_FILE).stat().st_size for n in ("compact", "dense")}
    out_dim, in_dim = compact.layer.weight.shape
    assert size["dense"] > out_dim * in_dim * 4 > size["compact"]


def test_rank_needs_whole_matrix_single_shard_memories():
    with pytest.raises(ValueError, match="memory.rank=4: a compact memory needs"):
        WiseConfig.from_settings(**{"memory.rank": 4, "shards.mask_ratio": 0.5})
    with pytest.raises(ValueError, match="shards.per_merge=1"):
        WiseConfig.from_settings(**{"memory.rank": 4, "shards.mask_ratio": 1.0})
    with pytest.raises(ValueError, match="rank"):
        WiseConfig.from_settings(**{"memory.rank": -1})


def test_a_save_whose_memories_have_another_rank_is_refused(tmp_path):
    editor = make("wise-compact")
    editor.edit(*EDITS[0])
    editor.save_pretrained(tmp_path / "save")
    config_file = tmp_path / "save" / CONFIG_FILE
    text = config_file.read_text().replace('"rank": 8', '"rank": 7')
    config_file.write_text(text)
    model = editor.detach()
    with pytest.raises(ValueError, match="rank"):
        WiseEditor.from_pretrained(model, editor.tokenizer, tmp_path / "save")


def test_the_summary_gives_the_state_per_edit_saved_and_in_ram():
    editor = make("wise-compact")
    for prompt, target in EDITS[:3]:
        editor.edit(prompt, target)
    out_dim, in_dim = editor.layer.weight.shape
    # per edit: its product (rank 8), its key and its subject key, float32
    saved = sum(t.numel() * 4 for t in editor.layer.memories.state_dict().values())
    assert saved == 3 * 4 * ((out_dim + in_dim) * 8 + in_dim + out_dim)
    summary = editor.summary()
    assert summary["saved_kb_per_edit"] == round(saved / 3 / 1e3, 1)
    cached = sum(a.numel() * 2 for a in editor._prompt_acts.values())  # bfloat16
    assert cached > 0
    assert summary["ram_kb_per_edit"] == round((saved + cached) / 3 / 1e3, 1)
