"""Exact, hand-computed tests for wise_edit.wise.router: activation score, margin loss,
replay loss, threshold, top-1 route and the score unit."""

import pytest
import torch

from wise_edit.wise.router import (
    background_radius,
    candidate_memories,
    margin_loss,
    memory_nearness,
    replay_loss,
    route,
    route_sparse,
    score_unit,
    sequence_scores,
    threshold,
    value_change,
    within_radius,
)


def test_sequence_score_is_the_mean_norm_over_the_rows_own_tokens():
    delta = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # a @ delta^T = (a0, 2 a1)
    acts = torch.tensor(
        [
            [[3.0, 0.0], [0.0, 2.0], [9.0, 9.0]],  # norms 3, 4, (pad)
            [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]],  # (pad), 1, 0
        ]
    )
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    torch.testing.assert_close(sequence_scores(acts, delta, mask), torch.tensor([3.5, 0.5]))


def test_value_change_is_the_input_times_the_delta_transposed():
    delta = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]])  # (O, I) = (2, 3)
    acts = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 1.0, 0.0]]])  # (B, T, I) = (2, 1, 3)
    expected = torch.tensor([[[7.0, 1.0]], [[0.0, -1.0]]])
    assert torch.equal(value_change(acts, delta), expected)
    torch.manual_seed(0)
    acts, delta = torch.randn(3, 4, 5, dtype=torch.bfloat16), torch.randn(6, 5)
    out = value_change(acts, delta)
    assert out.shape == (3, 4, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, acts.float() @ delta.t())


def test_sequence_score_of_a_row_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    acts, delta = torch.randn(3, 4, 5), torch.randn(6, 5)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    together = sequence_scores(acts, delta, mask)
    alone = sequence_scores(acts[1:2, 2:], delta, mask[1:2, 2:])
    torch.testing.assert_close(together[1:2], alone)


def test_margin_loss_terms_by_hand():
    edit = torch.tensor([3.0, 0.5])
    irrelevant = torch.tensor([0.2, 1.0])
    alpha, beta, gamma = 0.5, 2.0, 1.0
    # relu(irr - alpha): 0, 0.5 -> .25 ; relu(beta - edit): 0, 1.5 -> .75
    # gaps edit - irr: [[2.8, 2.0], [0.3, -0.5]] -> relu(1 - gap): 0, 0, .7, 1.5 -> .55
    loss = margin_loss(edit, irrelevant, alpha, beta, gamma)
    assert loss.item() == pytest.approx(0.25 + 0.75 + 0.55)


def test_margin_loss_is_zero_when_every_margin_holds():
    loss = margin_loss(torch.tensor([5.0, 6.0]), torch.tensor([0.1, 0.2]), 0.5, 2.0, 1.0)
    assert loss.item() == 0.0


def test_replay_loss_pushes_only_scores_above_alpha():
    loss = replay_loss(torch.tensor([0.1, 0.9, 2.0]), alpha=0.5)
    assert loss.item() == pytest.approx((0.0 + 0.4 + 1.5) / 3)


def test_threshold_is_ratio_times_the_minimum():
    assert threshold(torch.tensor([4.0, 2.5, 3.0]), 0.8) == pytest.approx(2.0)


def test_route_top1_over_memories_each_with_its_own_threshold():
    scores = torch.tensor(
        [
            [5.0, 1.0, 2.0, 0.0],  # memory 0, threshold 3
            [4.0, 6.0, 2.5, 0.0],  # memory 1, threshold 7
        ]
    )
    thresholds = torch.tensor([3.0, 7.0])
    # row 0: memory 0 best and clears 3; row 1: memory 1 best (6) but below its 7 -> -1,
    # although memory 0's score 1 is irrelevant (top-1 first, then its own threshold)
    # row 2: memory 1 best (2.5) below 7 -> -1; row 3: nothing scores -> -1
    assert route(scores, thresholds).tolist() == [0, -1, -1, -1]


def test_route_ties_pick_the_first_memory_and_equal_to_threshold_is_not_above():
    scores = torch.tensor([[3.0, 2.0], [3.0, 2.0]])  # both rows: a tie between memories
    assert route(scores, torch.tensor([1.0, 1.0])).tolist() == [0, 0]
    # the tie goes to memory 0; its threshold decides, even where memory 1's would pass
    assert route(scores, torch.tensor([2.0, 1.0])).tolist() == [0, -1]
    assert route(scores, torch.tensor([3.0, 1.0])).tolist() == [-1, -1]


def test_route_with_nothing_above_any_threshold_is_the_main_memory():
    scores = torch.tensor([[0.5, 0.1]])
    assert route(scores, torch.tensor([1.0])).tolist() == [-1, -1]


def test_score_unit_is_the_median_of_mean_token_norms():
    outputs = torch.tensor(
        [
            [[3.0, 4.0], [0.0, 0.0]],  # norm 5, pad
            [[0.0, 1.0], [0.0, 3.0]],  # norms 1, 3 -> 2
            [[6.0, 8.0], [0.0, 10.0]],  # norms 10, 10 -> 10
        ]
    )
    mask = torch.tensor([[1, 0], [1, 1], [1, 1]])
    assert score_unit(outputs, mask) == pytest.approx(5.0)


def test_mean_inputs_and_nearest():
    from wise_edit.wise.router import mean_inputs, nearest

    acts = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_inputs(acts, mask), torch.tensor([[2.0, 1.0]]))
    keys = torch.tensor([[0.0, 1.0], [2.0, 1.1], [-1.0, 0.0], [1.0, 1.0]])
    assert nearest(torch.tensor([2.0, 1.0]), keys, 2) == [1, 3]
    assert nearest(torch.tensor([2.0, 1.0]), keys, 9) == [1, 3, 0, 2]


def test_candidate_memories_are_those_of_the_nearest_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    owners = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[2.0, 0.1], [0.1, 3.0]])
    picked, sims = candidate_memories(queries, keys, owners, 2)
    assert picked.tolist() == [[0, 1], [1, 1]]
    assert (sims[:, 0] >= sims[:, 1]).all()
    assert candidate_memories(queries, keys, owners, 9)[0].shape == (2, 4)


def test_sparse_route_equals_dense_route_when_every_memory_is_a_candidate():
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.rand(5, 7) * 10  # (M, B)
        scores[1, 3] = scores[2, 3] = 11.0  # a tie
        thresholds = torch.rand(5) * 8
        order = torch.stack([torch.randperm(5) for _ in range(7)])  # (B, M), any key order
        sparse = route_sparse(order, lambda m, rows, s=scores: s[m][rows], thresholds)
        assert torch.equal(sparse, route(scores, thresholds))
        # keys no prompt repeats change nothing
        far = torch.full(order.shape, 0.9)
        again = route_sparse(order, lambda m, rows, s=scores: s[m][rows], thresholds, far)
        assert torch.equal(again, sparse)


def test_an_edits_own_prompt_goes_to_its_memory_when_that_clears_its_threshold():
    from wise_edit.wise.router import VERBATIM

    scores = torch.tensor([[9.0, 9.0, 9.0], [5.0, 1.0, 5.0]])  # (M=2, B=3)
    thresholds = torch.tensor([2.0, 4.0])
    candidates = torch.tensor([[0, 1], [0, 1], [0, 1]])
    # row 0: memory 1 holds the prompt's own edit and clears; row 1: it does not clear;
    # row 2: memory 1's key is only near the prompt's
    similarity = torch.tensor([[0.9, 1.0], [0.9, 1.0], [0.9, VERBATIM - 0.01]])
    out = route_sparse(candidates, lambda m, rows: scores[m][rows], thresholds, similarity)
    assert out.tolist() == [1, 0, 0]
    # the top scorer below its own threshold: no side memory, though memory 1 clears
    low = torch.tensor([[5.0], [4.5]])
    out = route_sparse(
        torch.tensor([[1, 0]]),
        lambda m, rows: low[m][rows],
        torch.tensor([6.0, 4.0]),
        torch.tensor([[1.0, 0.5]]),
    )
    assert out.tolist() == [-1]


def test_sparse_route_only_considers_the_candidates():
    scores = torch.tensor([[9.0, 1.0], [5.0, 5.0], [1.0, 9.0]])  # (M=3, B=2)
    thresholds = torch.tensor([2.0, 2.0, 2.0])
    candidates = torch.tensor([[1, 2], [0, 1]])  # row 0 cannot see memory 0
    out = route_sparse(candidates, lambda m, rows: scores[m][rows], thresholds)
    assert out.tolist() == [1, 1]


def test_candidates_outside_the_key_radius_are_none():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    owners = torch.tensor([0, 1, 1, 2])
    queries = torch.tensor([[2.0, 0.1], [0.1, 3.0]])
    # cosines: row 0 -> key 0 .999, key 2 .74; row 1 -> key 1 .9994, key 2 .73
    assert candidate_memories(queries, keys, owners, 2, radius=0.9)[0].tolist() == [
        [0, -1],
        [1, -1],
    ]
    assert candidate_memories(queries, keys, owners, 2, radius=0.7)[0].tolist() == [[0, 1], [1, 1]]


def test_memory_nearness_is_the_best_cosine_over_each_memorys_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    owners = torch.tensor([0, 1, 1])  # memory 2 holds no key
    queries = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    near = memory_nearness(queries, keys, owners, 3)
    half = 2**-0.5
    torch.testing.assert_close(near[:2], torch.tensor([[1.0, 0.0], [half, -half]]))
    assert torch.isinf(near[2]).all() and (near[2] < 0).all()


def test_a_memory_outside_the_radius_cannot_win_even_with_the_best_score():
    scores = torch.tensor([[9.0, 9.0], [5.0, 1.0]])  # (M=2, B=2)
    nearness = torch.tensor([[0.5, 0.95], [0.9, 0.9]])
    thresholds = torch.tensor([2.0, 2.0])
    assert route(within_radius(scores, nearness, 0.8), thresholds).tolist() == [1, 0]
    assert route(within_radius(scores, nearness, 0.99), thresholds).tolist() == [-1, -1]
    assert route(within_radius(scores, nearness, 0.0), thresholds).equal(route(scores, thresholds))


def test_sparse_route_skips_rows_without_candidates():
    scores = torch.tensor([[9.0, 9.0]])
    candidates = torch.tensor([[-1, -1], [0, -1]])
    out = route_sparse(candidates, lambda m, rows: scores[m][rows], torch.tensor([2.0]))
    assert out.tolist() == [-1, 0]


def test_background_radius_is_a_quantile_of_the_pairwise_cosines():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (0, 1) 0, (0, 2) and (1, 2) 1/sqrt(2)
    assert background_radius(keys, 0.0) == pytest.approx(0.0)
    assert background_radius(keys, 1.0) == pytest.approx(2**-0.5)
    assert background_radius(keys, 0.25) == pytest.approx(0.5 * 2**-0.5)
    with pytest.raises(ValueError, match="at least two"):
        background_radius(keys[:1], 0.5)
