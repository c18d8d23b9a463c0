"""Metrics: each checked against a direct computation on a tiny model."""

import math

import pytest
import torch
from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor, metrics
from wise_edit.core.prompts import PromptFormat
from wise_edit.core.rows import target_ids


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5)


@pytest.fixture
def fmt(tokenizer):
    return PromptFormat.create(tokenizer, "raw")


def _greedy_text(model, fmt, prompt, n):
    ids = metrics.greedy_continuation(model, fmt, prompt, n)
    return ids, fmt.tokenizer.decode(ids)


def test_target_logits_equal_one_full_forward(model, tokenizer):
    prompt, target = EDITS[0]
    p_ids, t_ids = tokenizer(prompt)["input_ids"], target_ids(tokenizer, target)
    cached = metrics.target_logits(model, p_ids, t_ids)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0]
    n = len(t_ids)
    torch.testing.assert_close(cached, full[-n - 1 : -1], atol=1e-5, rtol=1e-4)


def test_token_accuracy_is_one_for_the_models_own_continuation(model, fmt, monkeypatch):
    prompt = EDITS[1][0]
    ids, text = _greedy_text(model, fmt, prompt, 4)
    # byte-level BPE need not re-encode a decoded string to the same ids; pin them
    monkeypatch.setattr(PromptFormat, "target_ids", lambda self, target: ids)
    assert metrics.token_accuracy(model, fmt, prompt, text) == 1.0
    assert metrics.prefix_match(model, fmt, prompt, text) == 1.0


def test_token_accuracy_counts_positions(model, fmt, tokenizer):
    prompt, target = EDITS[2]
    tgt = target_ids(tokenizer, target)
    logits = metrics.target_logits(model, tokenizer(prompt)["input_ids"], tgt)
    expected = (logits.argmax(-1) == torch.tensor(tgt)).float().mean().item()
    assert metrics.token_accuracy(model, fmt, prompt, target) == pytest.approx(expected)


def test_agreement():
    assert metrics.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert metrics.agreement([5], [5]) == 1.0
    with pytest.raises(ValueError):
        metrics.agreement([1, 2], [1])
    with pytest.raises(ValueError):
        metrics.agreement([], [])


def test_perplexity_and_ood(model, fmt, tokenizer):
    prompt, target = EDITS[3]
    p_ids, t_ids = tokenizer(prompt)["input_ids"], target_ids(tokenizer, target)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0, len(p_ids) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(t_ids)).item()
    assert metrics.perplexity(model, fmt, prompt, target) == pytest.approx(math.exp(nll), rel=1e-4)
    assert metrics.ood_success(model, fmt, prompt, target) == float(nll < -math.log(0.8))
    assert pytest.approx(0.2231, abs=1e-4) == metrics.OOD_LOSS_LIMIT


def test_prefix_match_normalises_whitespace_and_case(monkeypatch, model, fmt, tokenizer):
    monkeypatch.setattr(
        metrics, "greedy_continuation", lambda *a: tokenizer(" eliel  SAARINEN,")["input_ids"]
    )
    assert metrics.prefix_match(model, fmt, "Who?", "Eliel Saarinen") == 1.0
    assert metrics.prefix_match(model, fmt, "Who?", "Alvar Aalto") == 0.0
    assert metrics.normalise("  A\n b ") == "a b"


def test_metrics_route_on_the_prompt(tokenizer, fmt):
    """Through an editor, teacher forcing continues the prompt's routing decision."""
    model = tiny_model("llama")
    editor = WiseEditor(model, tokenizer, fast_config(max_steps=30, lr=0.05))
    prompt, target = EDITS[0]
    with editor.layer.disabled():
        before = metrics.token_accuracy(model, fmt, prompt, target)
    editor.edit(prompt, target)
    after = metrics.token_accuracy(model, fmt, prompt, target)
    assert after > before
    with editor.layer.trial(editor.memories[0].delta):
        forced = metrics.target_logits(
            model, tokenizer(prompt)["input_ids"], target_ids(tokenizer, target)
        )
    routed = metrics.target_logits(
        model, tokenizer(prompt)["input_ids"], target_ids(tokenizer, target)
    )
    assert torch.equal(forced, routed)


def test_answer_normalisation_on_hand_made_strings():
    assert metrics.normalise_answer("  Paris.\n") == "paris"
    assert metrics.normalise_answer("Eliel  SAARINEN!?") == "eliel saarinen"
    assert metrics.normalise_answer("U.S.") == "u.s"  # only trailing punctuation goes
    assert metrics.exact_answer("Paris.", "paris") == 1.0
    assert metrics.exact_answer("Volkswagen Group Group Group", "Volkswagen Group") == 0.0
    assert metrics.exact_answer("Lamiinae 2016 201", "Lamiinae") == 0.0
    assert metrics.exact_answer("", "Paris") == 0.0
    assert metrics.starts_with("Volkswagen Group Group", "volkswagen group") == 1.0
    assert metrics.contains("It is made by Volvo, I think.", "volvo") == 1.0
    assert metrics.contains("It is made by Saab.", "Volvo.") == 0.0


def test_answer_text_ends_at_the_stop_or_the_first_newline(fmt, tokenizer):
    eos = tokenizer.eos_token_id
    said = tokenizer(" Eliel Saarinen")["input_ids"]
    more = tokenizer(" river")["input_ids"]
    assert metrics.answer_text(fmt, said + [eos] + more) == "Eliel Saarinen"
    assert metrics.answer_text(fmt, said + tokenizer("\nriver")["input_ids"]) == "Eliel Saarinen"
    assert metrics.answer_text(fmt, said + more) == "Eliel Saarinen river"
    assert metrics.reply_text(fmt, said + [eos] + more) == " Eliel Saarinen"


def test_answer_match_needs_the_answer_to_stop(monkeypatch, model, fmt, tokenizer):
    target, eos = "Eliel Saarinen", tokenizer.eos_token_id
    stopped = tokenizer(" Eliel Saarinen")["input_ids"] + [eos]
    rambles = tokenizer(" Eliel Saarinen Saarinen Saarinen")["input_ids"]
    monkeypatch.setattr(metrics, "greedy_continuation", lambda *a: stopped)
    assert metrics.answer_match(model, fmt, "Who?", target) == 1.0
    assert metrics.prefix_match(model, fmt, "Who?", target) == 1.0
    monkeypatch.setattr(metrics, "greedy_continuation", lambda *a: rambles)
    assert metrics.answer_match(model, fmt, "Who?", target) == 0.0
    assert metrics.prefix_match(model, fmt, "Who?", target) == 1.0  # what it could not see
    assert metrics.reply_contains(model, fmt, "Who?", target) == 1.0


def test_decoder_cuts_one_decoding_to_each_budget(model, fmt):
    prompt = EDITS[3][0]
    decode = metrics.Decoder(model, fmt)
    longest = decode(prompt, 12)
    for n in (1, 5, 12):
        assert decode(prompt, n) == metrics.greedy_continuation(model, fmt, prompt, n)
    assert decode.decodings == 1
    # a larger budget than any decoding so far (which ran to its budget) decodes again
    assert decode(prompt, 16) == metrics.greedy_continuation(model, fmt, prompt, 16)
    assert decode(prompt, 16)[:12] == longest and decode.decodings == 2


def test_decoder_keeps_an_answer_that_stopped_for_any_budget(monkeypatch, model, fmt, tokenizer):
    stopped = tokenizer(" Eliel")["input_ids"] + [tokenizer.eos_token_id]
    budgets = []
    monkeypatch.setattr(
        metrics, "greedy_continuation", lambda m, f, p, n: budgets.append(n) or stopped[:n]
    )
    decode = metrics.Decoder(model, fmt)
    assert decode("Who?", 10) == stopped
    assert decode("Who?", 40) == stopped and budgets == [10]
    assert metrics.answer_match(model, fmt, "Who?", "Eliel", decode=decode) == 1.0
    assert metrics.prefix_match(model, fmt, "Who?", "Eliel", decode=decode) == 1.0
    assert budgets == [10]


# --- batched decoding (`greedy_continuations`, `Decoder.prefetch`) ---------------------
SAME_LENGTH = [  # 21 tokens each with the tiny tokenizer: a decoding batch without padding
    EDITS[0][0],
    "Who designed Turku Town Hall?",
    "Who painted the Lahti Town Hall?",
    "Who designed Lahti Old Hall?",
]


def _alone_and_batched(model, fmt, prompts, n):
    ids = [fmt.prompt_ids(p) for p in prompts]
    assert len({len(i) for i in ids}) == 1
    alone = [metrics.greedy_continuation(model, fmt, p, n) for p in prompts]
    return alone, metrics.greedy_continuations(model, fmt, ids, n)


def test_a_decoding_batch_decodes_each_prompt_as_alone(family, tokenizer):
    fmt = PromptFormat.create(tokenizer, "raw")
    alone, batched = _alone_and_batched(tiny_model(family), fmt, SAME_LENGTH, 12)
    assert batched == alone


def test_a_decoding_batch_routes_each_row_as_alone(tokenizer):
    strong = fast_config(max_steps=100, lr=0.05, early_stop_loss=0.01)
    editor = WiseEditor(tiny_model("llama"), tokenizer, strong)
    editor.edit(*EDITS[0])
    routed = editor.routed(SAME_LENGTH)
    assert routed[0] == 0 and -1 in routed  # the batch mixes routed and unrouted rows
    alone, batched = _alone_and_batched(editor.model, editor.format, SAME_LENGTH, 12)
    assert batched == alone
    assert metrics.answer_text(editor.format, batched[0]).strip() == EDITS[0][1]


def test_a_decoding_batch_refuses_prompts_of_different_lengths(model, fmt):
    with pytest.raises(ValueError, match="one token length"):
        metrics.greedy_continuations(model, fmt, [[5, 6, 7], [5, 6]], 4)


class _ScriptedModel(torch.nn.Module):
    """`generate` returns a fixed batch: the prompt, then the scripted new tokens."""

    def __init__(self, new: list[list[int]]) -> None:
        super().__init__()
        self.new, self.weight = torch.tensor(new), torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, **_kwargs):
        return torch.cat([input_ids, self.new], dim=1)


def test_a_row_that_stops_before_its_batch_is_cut_after_its_stop(fmt, tokenizer):
    eos, pad = tokenizer.eos_token_id, 0
    scripted = _ScriptedModel([[40, eos, pad, pad], [41, 42, 43, 44], [eos, pad, pad, pad]])
    rows = metrics.greedy_continuations(scripted, fmt, [[5, 6]] * 3, 4)
    assert rows == [[40, eos], [41, 42, 43, 44], [eos]]


def test_prefetch_gives_every_later_call_its_own_decoding(model, fmt):
    """Mixed lengths and budgets: batches of one length, each to its largest budget; a
    later call decodes nothing and answers as a decoding of its own budget would."""
    wanted = [(p, 6) for p in SAME_LENGTH] + [(EDITS[1][0], 9), (SAME_LENGTH[2], 10)]
    decode = metrics.Decoder(model, fmt, batch_size=3)
    decode.prefetch(wanted)
    assert decode.decodings == 5
    for prompt, budget in wanted:
        assert decode(prompt, budget) == metrics.greedy_continuation(model, fmt, prompt, budget)
    assert decode.decodings == 5
    decode.prefetch(wanted)  # all covered
    assert decode.decodings == 5


def test_prefetch_shows_its_progress(model, fmt, capsys):
    decode = metrics.Decoder(model, fmt, batch_size=3)
    decode.prefetch([(p, 4) for p in SAME_LENGTH])
    shown = capsys.readouterr().err
    assert "decoding:" in shown and f"/{len(SAME_LENGTH)} [" in shown
    decode.prefetch([(p, 4) for p in SAME_LENGTH])  # nothing left to decode: no bar
    assert capsys.readouterr().err == ""
    metrics.Decoder(model, fmt, batch_size=3, progress=False).prefetch(
        [(p, 4) for p in SAME_LENGTH]
    )
    assert capsys.readouterr().err == ""


def test_prefetch_with_batch_size_one_decodes_nothing_ahead(model, fmt):
    decode = metrics.Decoder(model, fmt, batch_size=1)
    decode.prefetch([(p, 6) for p in SAME_LENGTH])
    assert decode.decodings == 0
    with pytest.raises(ValueError, match="batch size"):
        metrics.Decoder(model, fmt, batch_size=0)


# --- batched teacher forcing (`batch_target_predictions`, `Decoder.prefetch_forced`) -----
TARGETS = ["Paris", "Rome", "Bern", "Sonck"]  # 4 tokens each with the tiny tokenizer


def _forced_alone_and_batched(model, fmt, prompts, targets):
    alone = [metrics.target_predictions(model, fmt, p, t) for p, t in zip(prompts, targets)]
    ids = [fmt.prompt_ids(p) for p in prompts]
    tgts = [fmt.target_ids(t) for t in targets]
    assert len({len(t) for t in tgts}) == 1
    return alone, metrics.batch_target_predictions(model, ids, tgts)


def test_a_forcing_batch_predicts_each_pair_as_alone(family, tokenizer):
    fmt = PromptFormat.create(tokenizer, "raw")
    alone, batched = _forced_alone_and_batched(tiny_model(family), fmt, SAME_LENGTH, TARGETS)
    assert batched == alone


def test_a_forcing_batch_routes_each_row_on_its_prompt(tokenizer):
    strong = fast_config(max_steps=100, lr=0.05, early_stop_loss=0.01)
    editor = WiseEditor(tiny_model("llama"), tokenizer, strong)
    editor.edit(EDITS[0][0], TARGETS[0])
    assert editor.routed(SAME_LENGTH)[0] == 0 and -1 in editor.routed(SAME_LENGTH)
    alone, batched = _forced_alone_and_batched(editor.model, editor.format, SAME_LENGTH, TARGETS)
    assert batched == alone
    assert batched[0] == editor.format.target_ids(TARGETS[0])  # the edit, teacher-forced


def test_a_forcing_batch_refuses_mixed_lengths(model):
    with pytest.raises(ValueError, match="one length"):
        metrics.batch_target_predictions(model, [[5, 6, 7], [5, 6]], [[8], [8]])
    with pytest.raises(ValueError, match="one length"):
        metrics.batch_target_predictions(model, [[5, 6], [5, 7]], [[8], [8, 9]])


def test_prefetch_forced_gives_every_later_call_its_own_predictions(model, fmt, capsys):
    """Mixed prompt and target lengths, a repeated pair: one batch per pair of lengths,
    each pair forced once, and later calls read what it would compute alone."""
    wanted = [*zip(SAME_LENGTH, TARGETS), (EDITS[1][0], "Poseidonia"), (SAME_LENGTH[0], "x")]
    decode = metrics.Decoder(model, fmt, batch_size=3)
    decode.prefetch_forced([*wanted, wanted[0]])
    shown = capsys.readouterr().err
    assert "teacher forcing:" in shown and f"/{len(wanted)} [" in shown
    calls = []
    real = metrics.target_predictions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "target_predictions", lambda *a: calls.append(a) or real(*a))
        got = [decode.forced(p, t) for p, t in wanted]
    assert not calls  # all read from the batches
    assert got == [real(model, fmt, p, t) for p, t in wanted]
    assert metrics.forced_accuracy(got[0], fmt.target_ids(TARGETS[0])) == metrics.token_accuracy(
        model, fmt, *wanted[0]
    )


def test_forced_accuracy_counts_positions():
    assert metrics.forced_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="equal length"):
        metrics.forced_accuracy([1], [1, 2])
