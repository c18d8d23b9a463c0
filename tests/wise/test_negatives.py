"""The margin loss's unrelated prompts: the nearest pool prompts by key cosine, the pool
computed once, and the random draw next to them."""

import torch

from wise_edit.wise.negatives import NegativePool, nearest, negatives


def test_nearest_ranks_keys_by_cosine():
    keys = torch.tensor([[0.0, 1.0], [2.0, 1.1], [-1.0, 0.0], [1.0, 1.0]])
    assert nearest(torch.tensor([2.0, 1.0]), keys, 2) == [1, 3]
    assert nearest(torch.tensor([2.0, 1.0]), keys, 9) == [1, 3, 0, 2]


def one_token_acts(prompts):
    """Fake value-matrix inputs: each prompt one token whose input is its length and 1."""
    acts = torch.tensor([[[float(len(p)), 1.0]] for p in prompts])
    return acts, torch.ones(len(prompts), 1)


def test_the_pool_is_a_seeded_sample_and_hard_negatives_skip_the_drawn_ones():
    pool = ["a", "bb", "ccc", "dddd", "eeeee"]
    one = NegativePool.build(pool, seed=0, prompt_acts=one_token_acts)
    again = NegativePool.build(pool, seed=0, prompt_acts=one_token_acts)
    assert one.prompts == again.prompts and sorted(one.prompts) == sorted(pool)
    query = torch.tensor([4.0, 1.0])  # nearest: "dddd", then "eeeee" / "ccc"
    best = [one.prompts[i] for i in one.nearest(query, 2, taken=set())]
    assert best[0] == "dddd"
    assert "dddd" not in [one.prompts[i] for i in one.nearest(query, 2, taken={"dddd"})]


def test_negatives_stack_the_random_and_the_hard_rows():
    pool = NegativePool.build(["a", "bb", "ccc"], seed=0, prompt_acts=one_token_acts)
    acts, mask = negatives(
        ["zz"], one_token_acts, pool, torch.tensor([3.0, 1.0]), 1, torch.device("cpu")
    )
    assert acts.shape == (2, 1, 2) and mask.tolist() == [[1], [1]]
    assert acts[0, 0].tolist() == [2.0, 1.0] and acts[1, 0].tolist() == [3.0, 1.0]
    acts, _ = negatives(
        ["zz"], one_token_acts, pool, torch.tensor([3.0, 1.0]), 0, torch.device("cpu")
    )
    assert acts.shape == (1, 1, 2)  # no hard negatives asked
