"""Edit rows: left padding, the prompt mask, target positions, and what cannot be learned."""

import pytest
import torch

from wise_edit.core.prompts import PromptFormat
from wise_edit.core.rows import build_rows, encode_prompts, left_pad, pad_id, target_ids


def test_left_pad_aligns_the_ends():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_rows_layout(tokenizer):
    prompt, target = "Who designed Lahti Town Hall?", "Eliel Saarinen"
    prefixes = ["The sky", "Because of this, the river"]
    rows = build_rows(PromptFormat.create(tokenizer), prompt, target, prefixes)
    tgt = target_ids(tokenizer, target)
    texts = [prompt] + [f"{p}. {prompt}" for p in prefixes]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(p) for p in prompts) + len(tgt)
    assert rows.input_ids.shape == (3, width)
    n = len(tgt)
    for row, ids in enumerate(prompts):
        pad = width - len(ids) - n
        # left padding, then the prompt, then the target in the same tail positions
        assert rows.input_ids[row, :pad].tolist() == [pad_id(tokenizer)] * pad
        assert rows.input_ids[row, pad : pad + len(ids)].tolist() == ids
        assert rows.input_ids[row, -n:].tolist() == tgt
        assert rows.attention_mask[row].tolist() == [0] * pad + [1] * (len(ids) + n)
        assert rows.prompt_mask[row].tolist() == [0] * pad + [1] * len(ids) + [0] * n
    assert rows.targets.tolist() == [tgt] * 3


def test_target_gets_one_leading_space(tokenizer):
    assert target_ids(tokenizer, "Paris") == target_ids(tokenizer, " Paris")
    assert tokenizer.decode(target_ids(tokenizer, "Paris")) == " Paris"


def test_encode_prompts_is_left_padded(tokenizer):
    ids, mask = encode_prompts(
        PromptFormat.create(tokenizer), ["Hi", "Who designed Lahti Town Hall?"]
    )
    assert mask[0, -1] == 1 and mask[0, 0] == 0 and bool(mask[1].all())
    assert ids[0, mask[0] == 0].eq(pad_id(tokenizer)).all()


@pytest.mark.parametrize(
    ("prompt", "target", "message"),
    [(" ", "x", "prompt is empty"), ("Who?", "  ", "target is empty")],
)
def test_what_cannot_be_learned_raises(tokenizer, prompt, target, message):
    with pytest.raises(ValueError, match=message):
        build_rows(PromptFormat.create(tokenizer), prompt, target, [])


def test_rows_move_to_a_device(tokenizer):
    rows = build_rows(PromptFormat.create(tokenizer), "Who?", "Bob", []).to(torch.device("cpu"))
    assert rows.input_ids.device.type == "cpu"


def test_answer_rows_align_each_target_and_ignore_the_rest(tokenizer):
    from conftest import tiny_model

    from wise_edit.core.fastpath import full_lm_loss
    from wise_edit.core.rows import IGNORE, build_answer_rows

    fmt = PromptFormat.create(tokenizer)
    pairs = [("Who designed Lahti Town Hall?", "Eliel Saarinen"), ("Capital of Oria?", "Mo")]
    rows = build_answer_rows(fmt, pairs, stop=True)
    tails = [target_ids(tokenizer, t) + [tokenizer.eos_token_id] for _, t in pairs]
    n = max(len(t) for t in tails)
    assert rows.targets.shape == (2, n)
    for row, ((prompt, _), tail) in enumerate(zip(pairs, tails)):
        ids = tokenizer(prompt)["input_ids"]
        real = rows.attention_mask[row].sum().item()
        assert rows.input_ids[row, -real:].tolist() == ids + tail
        assert rows.targets[row].tolist() == [IGNORE] * (n - len(tail)) + tail
        assert rows.prompt_mask[row, -real:].tolist() == [1] * len(ids) + [0] * len(tail)
    # the loss is the mean NLL over the real target tokens of both rows, nothing else
    model = tiny_model()
    with torch.no_grad():
        loss = full_lm_loss(model, rows.input_ids, rows.attention_mask, rows.targets)
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits
    nll = []
    for row, tail in enumerate(tails):
        logp = logits[row, -len(tail) - 1 : -1].log_softmax(-1)
        nll += [-logp[i, t].item() for i, t in enumerate(tail)]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_joined_rows_give_each_part_back():
    from wise_edit.core.rows import IGNORE, EditRows

    def rows(lengths, n):
        ids, mask = left_pad([[7] * k for k in lengths], 0)
        return EditRows(ids, mask, mask.clone(), torch.full((len(lengths), n), 5))

    first, second = rows([3, 2], 1), rows([5], 2)
    joined = EditRows.join([first, second], pad=0)
    assert joined.input_ids.shape == (3, 5) and joined.targets.shape == (3, 2)
    assert joined.targets[:2, 0].eq(IGNORE).all() and joined.targets[2].eq(5).all()
    taken, start = joined.take([0, 1])
    assert start == 2 and torch.equal(taken.input_ids, first.input_ids)
    assert torch.equal(taken.attention_mask, first.attention_mask)
