"""Exact, hand-computed tests for wise_edit.wise.router: activation score, margin loss,
replay loss, threshold, the key index and every routing rule of `route`."""

import pytest
import torch

from wise_edit.wise.memory import SideMemory
from wise_edit.wise.router import (
    VERBATIM,
    KeyIndex,
    candidate_scores,
    candidates_of,
    margin_loss,
    mean_inputs,
    replay_loss,
    route,
    sequence_scores,
    threshold,
    top1,
    value_change,
)


def dense(scores, thresholds):
    """Algorithm 2 over every memory (scores (M, B)): `top1` with each row's candidates
    all memories and no key near."""
    memories, batch = scores.shape
    candidates = torch.arange(memories).expand(batch, memories)
    return top1(candidates, scores.t(), thresholds, torch.zeros(batch, memories))


def scored(candidates, scores):
    """`candidate_scores` of candidates (B, k) from a table of scores (M, B)."""
    return candidate_scores(candidates, lambda m, rows: scores[m][rows])


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
    assert dense(scores, thresholds).tolist() == [0, -1, -1, -1]


def test_route_ties_pick_the_first_memory_and_equal_to_threshold_is_not_above():
    scores = torch.tensor([[3.0, 2.0], [3.0, 2.0]])  # both rows: a tie between memories
    assert dense(scores, torch.tensor([1.0, 1.0])).tolist() == [0, 0]
    # the tie goes to memory 0; its threshold decides, even where memory 1's would pass
    assert dense(scores, torch.tensor([2.0, 1.0])).tolist() == [0, -1]
    assert dense(scores, torch.tensor([3.0, 1.0])).tolist() == [-1, -1]


def test_route_with_nothing_above_any_threshold_is_the_main_memory():
    scores = torch.tensor([[0.5, 0.1]])
    assert dense(scores, torch.tensor([1.0])).tolist() == [-1, -1]


def test_mean_inputs_are_the_keys_of_sequences():
    acts = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_inputs(acts, mask), torch.tensor([[2.0, 1.0]]))


def index_of(keys, owners):
    """A key index over ``keys`` (E, I) held by memories ``owners`` (E,)."""
    per_memory = [keys[owners == m] for m in range(int(owners.max()) + 1)]
    return KeyIndex.current(per_memory, keys.device, None)


def one_token(queries):
    """Queries (B, I) as sequences of one token each, with their mask."""
    return queries[:, None, :], torch.ones(queries.shape[0], 1)


def test_candidates_are_the_memories_of_the_nearest_keys():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    index = index_of(keys, torch.tensor([0, 1, 1, 2]))
    acts, mask = one_token(torch.tensor([[2.0, 0.1], [0.1, 3.0]]))
    picked, sims = candidates_of(acts, mask, index, 2, radius=0.0)
    assert picked.tolist() == [[0, 1], [1, 1]]
    assert (sims[:, 0] >= sims[:, 1]).all()
    assert candidates_of(acts, mask, index, 9, radius=0.0)[0].shape == (2, 4)


def test_the_key_index_is_rebuilt_only_when_a_memorys_keys_are_replaced():
    keys = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    index = KeyIndex.current(keys, torch.device("cpu"), None)
    assert KeyIndex.current(list(keys), torch.device("cpu"), index) is index
    keys[1] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    again = KeyIndex.current(keys, torch.device("cpu"), index)
    assert again is not index and again.owners.tolist() == [0, 1, 1]


def test_sparse_top1_equals_dense_when_every_memory_is_a_candidate():
    torch.manual_seed(0)
    for _ in range(20):
        scores = torch.rand(5, 7) * 10  # (M, B)
        scores[1, 3] = scores[2, 3] = 11.0  # a tie
        thresholds = torch.rand(5) * 8
        order = torch.stack([torch.randperm(5) for _ in range(7)])  # (B, M), any key order
        far = torch.full(order.shape, 0.9)  # keys no prompt repeats
        sparse = top1(order, scored(order, scores), thresholds, far)
        assert torch.equal(sparse, dense(scores, thresholds))


def test_an_edits_own_prompt_goes_to_its_memory_when_that_clears_its_threshold():
    scores = torch.tensor([[9.0, 9.0, 9.0], [5.0, 1.0, 5.0]])  # (M=2, B=3)
    thresholds = torch.tensor([2.0, 4.0])
    candidates = torch.tensor([[0, 1], [0, 1], [0, 1]])
    # row 0: memory 1 holds the prompt's own edit and clears; row 1: it does not clear;
    # row 2: memory 1's key is only near the prompt's
    similarity = torch.tensor([[0.9, 1.0], [0.9, 1.0], [0.9, VERBATIM - 0.01]])
    out = top1(candidates, scored(candidates, scores), thresholds, similarity)
    assert out.tolist() == [1, 0, 0]
    # the top scorer (memory 0) below its own threshold: the own memory still answers
    # where it clears (row 0), and nothing answers where the prompt is not an edit's own
    # (row 1) or its own memory does not clear (row 2)
    low = torch.tensor([[5.0, 5.0, 5.0], [4.5, 4.5, 3.5]])
    candidates = torch.tensor([[1, 0], [1, 0], [1, 0]])
    similarity = torch.tensor([[1.0, 0.5], [VERBATIM - 0.01, 0.5], [1.0, 0.5]])
    out = top1(candidates, scored(candidates, low), torch.tensor([6.0, 4.0]), similarity)
    assert out.tolist() == [1, -1, -1]


def test_top1_only_considers_the_candidates():
    scores = torch.tensor([[9.0, 1.0], [5.0, 5.0], [1.0, 9.0]])  # (M=3, B=2)
    thresholds = torch.tensor([2.0, 2.0, 2.0])
    candidates = torch.tensor([[1, 2], [0, 1]])  # row 0 cannot see memory 0
    out = top1(candidates, scored(candidates, scores), thresholds, torch.zeros(2, 2))
    assert out.tolist() == [1, 1]


def test_candidates_outside_the_key_radius_are_none():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    index = index_of(keys, torch.tensor([0, 1, 1, 2]))
    acts, mask = one_token(torch.tensor([[2.0, 0.1], [0.1, 3.0]]))
    # cosines: row 0 -> key 0 .999, key 2 .74; row 1 -> key 1 .9994, key 2 .73
    assert candidates_of(acts, mask, index, 2, radius=0.9)[0].tolist() == [[0, -1], [1, -1]]
    assert candidates_of(acts, mask, index, 2, radius=0.7)[0].tolist() == [[0, 1], [1, 1]]


def test_top1_skips_rows_without_candidates():
    scores = torch.tensor([[9.0, 9.0]])
    candidates = torch.tensor([[-1, -1], [0, -1]])
    out = top1(candidates, scored(candidates, scores), torch.tensor([2.0]), torch.zeros(2, 2))
    assert out.tolist() == [-1, 0]


def memory_with(delta, keys, epsilon):
    """A side memory holding ``delta`` with one edit per key, at threshold ``epsilon``."""
    memory = SideMemory(delta.shape, torch.device("cpu"))
    for i, key in enumerate(keys):
        memory.add_edit(
            i,
            0,
            torch.zeros_like(delta),
            [torch.ones_like(delta, dtype=torch.bool)],
            key,
            torch.zeros(delta.shape[0]),
        )
    memory.delta.copy_(delta)
    memory._epsilon = epsilon
    return memory


def test_route_applies_the_threshold_the_index_and_the_key_radius_together():
    # two memories on a 2-d input: memory 0 reads input 0, memory 1 input 1
    m0 = memory_with(torch.tensor([[2.0, 0.0]]), [torch.tensor([1.0, 0.0])], epsilon=1.0)
    m1 = memory_with(torch.tensor([[0.0, 2.0]]), [torch.tensor([0.0, 1.0])], epsilon=1.0)
    memories = [m0, m1]
    index = KeyIndex.current([m.keys for m in memories], torch.device("cpu"), None)
    acts, mask = one_token(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.7, 0.7], [0.1, 0.1]]))
    # scores: row 0 -> (2, .2), row 1 -> (.2, 2), row 2 -> (1.4, 1.4), row 3 -> (.2, .2)
    out = route(acts, mask, memories, index, candidates=0, radius=0.0)
    assert out.tolist() == [0, 1, 0, -1]  # row 2: a tie goes to memory 0
    # the key radius: row 2's key lies at cosine .71 of both edits' keys
    out = route(acts, mask, memories, index, candidates=0, radius=0.9)
    assert out.tolist() == [0, 1, -1, -1]
    # one candidate: each row scores only the memory of its nearest key
    out = route(acts, mask, memories, index, candidates=1, radius=0.0)
    assert out.tolist() == [0, 1, 0, -1]
    assert route(acts, mask, [], index, candidates=0, radius=0.0).tolist() == [-1] * 4


def test_without_the_gate_every_row_takes_its_top_memory():
    """The paper's "w.o. router" (Table 7): threshold and key radius are both ignored."""
    m0 = memory_with(torch.tensor([[2.0, 0.0]]), [torch.tensor([1.0, 0.0])], epsilon=1.0)
    m1 = memory_with(torch.tensor([[0.0, 2.0]]), [torch.tensor([0.0, 1.0])], epsilon=1.0)
    memories = [m0, m1]
    index = KeyIndex.current([m.keys for m in memories], torch.device("cpu"), None)
    acts, mask = one_token(torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.7, 0.7], [0.1, 0.2]]))
    out = route(acts, mask, memories, index, candidates=0, radius=0.9, gate=False)
    assert out.tolist() == [0, 1, 0, 1]  # row 3 scores (.2, .4): below both thresholds
    assert route(acts, mask, memories, index, candidates=0, radius=0.9).tolist() == [0, 1, -1, -1]
    assert route(acts, mask, [], index, candidates=0, radius=0.0, gate=False).tolist() == [-1] * 4


def test_a_grouped_change_gives_each_group_of_rows_its_own_change():
    from wise_edit.wise.router import Factors, Grouped

    torch.manual_seed(0)
    acts = torch.randn(5, 3, 4)
    dense, product = torch.randn(6, 4), Factors(torch.randn(6, 2), torch.randn(2, 4))
    out = value_change(acts, Grouped((dense, product), (2, 3)))
    assert torch.allclose(out[:2], value_change(acts[:2], dense))
    assert torch.allclose(out[2:], value_change(acts[2:], product))
