"""Prompt formats: the template's fixed tokens found and masked out of routing, chat rows,
and the stop each format trains."""

import pytest
import torch
from conftest import EDITS, tiny_chat_tokenizer

from wise_edit.core.prompts import (
    PromptFormat,
    common_prefix,
    common_suffix,
    content_mask,
    strip_affixes,
)
from wise_edit.core.rows import build_rows


def test_common_affixes():
    assert common_prefix([1, 2, 3, 9], [1, 2, 4]) == [1, 2]
    assert common_suffix([7, 5, 6], [8, 5, 6]) == [5, 6]
    assert common_prefix([1], [2]) == [] and common_suffix([], [1]) == []


def test_strip_affixes_counts_only_what_is_there():
    assert strip_affixes([1, 2, 5, 6, 8, 9], [1, 2], [8, 9]) == (2, 2)
    assert strip_affixes([5, 6, 8, 9], [1, 2], [8, 9]) == (0, 2)  # a raw prompt's end
    assert strip_affixes([1, 2, 8, 9], [1, 2], [8, 9]) == (0, 0)  # nothing would be left


def test_content_mask_skips_padding_and_template():
    ids = torch.tensor([[0, 1, 2, 5, 8, 9], [1, 2, 5, 6, 8, 9], [0, 0, 5, 6, 7, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    out = content_mask(ids, mask, [1, 2], [8, 9])
    assert out.tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]


def test_raw_format_stops_at_eos_and_chat_needs_a_template(tokenizer):
    fmt = PromptFormat.create(tokenizer)
    assert fmt.kind == "raw" and fmt.stop == tokenizer.eos_token_id
    assert fmt.prompt_ids("Who?") == tokenizer("Who?")["input_ids"]
    with pytest.raises(ValueError, match="chat template"):
        PromptFormat.create(tokenizer, "chat")
    with pytest.raises(ValueError, match="prompt_format"):
        PromptFormat.create(tokenizer, "markdown")


def test_chat_format_is_the_template_and_masks_its_fixed_tokens():
    tok = tiny_chat_tokenizer()
    fmt = PromptFormat.create(tok)  # auto: the tokenizer has a template
    assert fmt.kind == "chat" and fmt.stop == tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.stop != tok.eos_token_id and fmt.stop_ids() == sorted({fmt.stop, tok.eos_token_id})
    prompt = EDITS[0][0]
    ids = fmt.prompt_ids(prompt)
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert tok.decode(ids) == text
    mask = fmt.content_mask(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert tok.decode([i for i, m in zip(ids, mask[0].tolist()) if m]) == prompt
    assert fmt.target_ids(" Eliel Saarinen") == tok("Eliel Saarinen")["input_ids"]


def test_chat_rows_are_user_turn_then_answer_then_end_of_turn():
    tok = tiny_chat_tokenizer()
    fmt = PromptFormat.create(tok)
    prompt, target = EDITS[0]
    rows = build_rows(fmt, prompt, target, ["The sky"], stop=True)
    n = rows.targets.shape[1]
    assert rows.targets[0].tolist() == fmt.target_ids(target) + [fmt.stop]
    row0 = rows.input_ids[0][rows.attention_mask[0].bool()].tolist()
    assert row0 == fmt.prompt_ids(prompt) + fmt.target_ids(target) + [fmt.stop]
    # routing reads the user's text only: not the template, the pads or the answer
    read = rows.input_ids[1][rows.prompt_mask[1].bool()].tolist()
    assert tok.decode(read) == f"The sky. {prompt}"
    assert rows.prompt_mask[:, -n:].sum() == 0


def test_stop_is_trained_only_when_asked(tokenizer):
    fmt = PromptFormat.create(tokenizer)
    with_stop = build_rows(fmt, *EDITS[1], [], stop=True).targets[0].tolist()
    without = build_rows(fmt, *EDITS[1], []).targets[0].tolist()
    assert with_stop == without + [tokenizer.eos_token_id]
