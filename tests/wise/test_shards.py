"""Knowledge sharding: mask ratio and overlap, steps that leave masked-out entries
bit-equal, the norm bound, the seeded mask streams, and the merge of a full group."""

import torch

from wise_edit.core.seeds import mask_generator, merge_generator
from wise_edit.wise.memory import SideMemory
from wise_edit.wise.merging import get_merge
from wise_edit.wise.shards import (
    adam_direction,
    clamp_to_bound,
    masked_step,
    merge_group,
    random_masks,
)


def test_masks_have_the_ratio_and_overlap_about_ratio_squared():
    masks = random_masks((200, 100), 0.3, 2, mask_generator(0, 0, 0))
    assert all(m.dtype == torch.bool and m.shape == (200, 100) for m in masks)
    shares = [m.float().mean().item() for m in masks]
    assert all(abs(s - 0.3) < 0.02 for s in shares)
    overlap = (masks[0] & masks[1]).float().mean().item()
    assert abs(overlap - 0.09) < 0.015  # Theorem 2.1: rho^2
    assert not torch.equal(masks[0], masks[1])


def test_ratio_one_is_the_whole_matrix():
    masks = random_masks((3, 4), 1.0, 2, mask_generator(0, 0, 0))
    assert all(bool(m.all()) for m in masks)


def test_masks_are_reproducible_per_memory_and_group():
    def make(memory, group):
        return random_masks((50, 50), 0.5, 1, mask_generator(7, memory, group))[0]

    assert torch.equal(make(1, 2), make(1, 2))
    assert not torch.equal(make(1, 2), make(1, 3)) and not torch.equal(make(1, 2), make(2, 2))
    a = torch.rand(5, generator=merge_generator(7, 1, 2))
    b = torch.rand(5, generator=mask_generator(8, 1, 2))
    assert torch.equal(a, b)  # DARE's drops: the mask stream of seed + 1


def test_bad_ratio_raises():
    for ratio in (0.0, 1.5):
        try:
            random_masks((2, 2), ratio, 1, mask_generator(0, 0, 0))
        except ValueError as err:
            assert "mask ratio" in str(err)
        else:
            raise AssertionError(f"ratio {ratio} accepted")


def test_masked_step_leaves_masked_out_entries_bit_equal():
    torch.manual_seed(0)
    delta = torch.randn(6, 7)
    grad = torch.randn(6, 7)
    mask = torch.rand(6, 7) < 0.4
    out = masked_step(delta, grad, mask.float(), lr=0.5)
    assert torch.equal(out[~mask], delta[~mask])
    torch.testing.assert_close(out[mask], delta[mask] - 0.5 * grad[mask])


def test_clamp_keeps_the_memory_within_the_bound_of_the_weight():
    base = torch.tensor([0.8, -0.5, 0.0])
    step = torch.tensor([0.5, -0.9, 0.3])
    out = clamp_to_bound(step, base, 1.0)
    torch.testing.assert_close(base + out, torch.tensor([1.0, -1.0, 0.3]))
    assert clamp_to_bound(step, base, None) is step


def test_adam_first_direction_is_the_gradient_sign_and_moments_carry():
    grad = torch.tensor([0.5, -2.0, 0.0])
    direction, moments = adam_direction(None, grad, eps=0.0)
    # bias-corrected first step: m / sqrt(v) = g / |g|
    assert torch.equal(direction[:2], torch.tensor([1.0, -1.0])) and moments.steps == 1
    assert torch.allclose(moments.first, 0.1 * grad) and torch.allclose(
        moments.second, 1e-3 * grad**2
    )
    grad2 = torch.tensor([0.5, 2.0, 0.0])
    direction2, moments2 = adam_direction(moments, grad2, eps=0.0)
    m = 0.9 * 0.1 * grad + 0.1 * grad2
    v = 0.999 * 1e-3 * grad**2 + 1e-3 * grad2**2
    expected = (m / (1 - 0.9**2)) / (v / (1 - 0.999**2)).sqrt()
    assert moments2.steps == 2 and torch.allclose(direction2[:2], expected[:2])
    # fed to masked_step, entries outside the mask stay bit-equal
    delta = torch.tensor([0.3, 0.7, -0.1])
    out = masked_step(delta, direction2, torch.tensor([1.0, 0.0, 1.0]), lr=0.01)
    assert out[1] == delta[1] and out[0] != delta[0]


def test_a_full_group_merges_its_shards_on_top_of_earlier_merges_and_closes():
    memory = SideMemory((2, 3), torch.device("cpu"))
    masks = [
        torch.tensor([[1, 1, 0], [0, 0, 0]]).bool(),
        torch.tensor([[0, 1, 1], [0, 0, 0]]).bool(),
    ]
    zero = torch.zeros(3)
    memory.add_edit(0, 0, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), masks, zero, zero[:2])
    memory.add_edit(1, 1, torch.tensor([[0.0, 4.0, 6.0], [0.0, 0.0, 0.0]]), masks, zero, zero[:2])
    assert memory.shard_count == 2 and memory.masks.shape == (2, 2, 3)
    assert torch.equal(memory.shard_vector(1), torch.tensor([[0.0, 4.0, 6.0], [0.0, 0.0, 0.0]]))
    merge_group(
        memory,
        get_merge("linear"),
        density=1.0,
        generator=torch.Generator(),
        norm_bound=2.5,
        close=True,
    )
    # linear with weights 1/2: (1, 6, 6) / 2 = (0.5, 3, 3), clamped to the bound 2.5
    assert torch.equal(memory.delta, torch.tensor([[0.5, 2.5, 2.5], [0.0, 0.0, 0.0]]))
    assert memory.closed and memory.merges == 1 and memory.shard_count == 0
    assert memory.masks.shape == (0, 2, 3) and memory.group_edits == 0
