"""Edits that stop, and edits made and asked in a chat template, on tiny models."""

import torch
from conftest import EDITS, fast_config, tiny_chat_tokenizer, tiny_model

from wise_edit import WiseEditor, metrics
from wise_edit.neutral import NEUTRAL_PROMPTS

STRONG = dict(max_steps=100, lr=0.05, early_stop_loss=0.01)


def test_an_edit_answers_then_stops(tokenizer):
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config(**STRONG))
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    fmt = editor.format
    ids = metrics.greedy_continuation(model, fmt, prompt, 20)
    assert ids == fmt.target_ids(target) + [tokenizer.eos_token_id]
    assert metrics.answer_match(model, fmt, prompt, target) == 1.0


def test_without_train_stop_the_answer_goes_on(tokenizer):
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config(**STRONG, train_stop=False))
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    ids = metrics.greedy_continuation(model, editor.format, prompt, 20)
    n = len(editor.format.target_ids(target))
    assert ids[:n] == editor.format.target_ids(target)
    assert ids[n : n + 1] != [tokenizer.eos_token_id]


def test_chat_edit_is_answered_in_the_template_and_unrelated_chat_prompts_are_not_routed():
    tok = tiny_chat_tokenizer()
    model = tiny_model("llama")
    editor = WiseEditor(model, tok, fast_config(**STRONG))
    assert editor.config.prompt_format == "auto" and editor.format.kind == "chat"
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    # what a user of the chat model does: the template, then model.generate
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    batch = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **batch,
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=editor.format.stop_ids(),
    )
    reply = out[0, batch["input_ids"].shape[1] :].tolist()
    assert reply == editor.format.target_ids(target) + [tok.convert_tokens_to_ids("<|im_end|>")]
    unrelated = list(NEUTRAL_PROMPTS[:8])
    assert editor.routed([prompt]) == [0]
    assert editor.routed(unrelated) == [-1] * len(unrelated)


def test_chat_routing_reads_only_the_users_text():
    """Two chat prompts share the template's 30-odd tokens; their scores must come from
    the user's text alone: equal to the score of the text's own tokens in context."""
    tok = tiny_chat_tokenizer()
    editor = WiseEditor(tiny_model("llama"), tok, fast_config(**STRONG))
    editor.edit(*EDITS[0])
    prompt = EDITS[3][0]
    acts, mask = editor._prompt_batch_acts([prompt])
    ids = editor.format.prompt_ids(prompt)
    assert int(mask.sum()) == len(tok(prompt)["input_ids"]) < len(ids)
    full = torch.ones_like(mask)
    from wise_edit.wise.router import sequence_scores

    delta = editor.memories[0].delta
    with_template = sequence_scores(acts, delta, full)
    assert not torch.allclose(with_template, sequence_scores(acts, delta, mask))
    torch.testing.assert_close(
        editor.activation_scores([prompt])[0], sequence_scores(acts, delta, mask)
    )


def test_a_forward_without_attention_mask_routes_on_the_users_text_too():
    """Teacher-forced metrics call the model with input ids only: the decision must still
    leave the template out, as `routed` does."""
    tok = tiny_chat_tokenizer()
    model = tiny_model("gpt2")  # passes input_ids to its backbone by position
    editor = WiseEditor(model, tok, fast_config(**STRONG))
    editor.edit(*EDITS[0])
    ids = torch.tensor([editor.format.prompt_ids(EDITS[3][0])])
    with torch.no_grad():
        model(input_ids=ids)
    read = editor.layer.routing.token_mask
    assert read is not None and int(read.sum()) == len(tok(EDITS[3][0])["input_ids"])


def test_chat_rows_capture_the_template_header_once():
    """The chat template's header is captured once and shared by every row after it
    (`WiseEditor._capture_ids`), with what running each whole row gives."""
    from wise_edit.core.editor import EditorBase

    editor = WiseEditor(tiny_model("llama"), tiny_chat_tokenizer(), fast_config())
    rows = editor._edit_rows(*EDITS[0])
    ids, mask = rows.input_ids, rows.attention_mask
    shared = editor._capture_ids(ids, mask, True)
    assert editor._head is not None and len(editor._head.ids) >= 8
    whole = EditorBase._capture_ids(editor, ids, mask, True)
    real = mask.bool()
    torch.testing.assert_close(shared.acts[real], whole.acts[real], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(
        shared.lower_output[real], whole.lower_output[real], atol=5e-5, rtol=1e-4
    )
    raw = WiseEditor(tiny_model("llama"), tiny_chat_tokenizer(), fast_config(prompt_format="raw"))
    raw_rows = raw._edit_rows(*EDITS[0])
    raw._capture_ids(raw_rows.input_ids, raw_rows.attention_mask, True)
    assert raw._head is None  # raw prompts share no header
