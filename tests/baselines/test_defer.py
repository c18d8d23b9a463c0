"""DEFER: a logistic gate over whole sequences, held while a sequence is generated."""

import torch
from conftest import EDITS
from editors import UNRELATED, layer_io, make

from wise_edit.baselines.defer import gate_probability


# ---------------------------------------------------------------------------- DEFER
def test_gate_probability_is_a_logistic_probe():
    query = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    p = gate_probability(query, torch.tensor([0.5, -1.0]), torch.tensor(0.25))
    torch.testing.assert_close(p, torch.sigmoid(torch.tensor([0.5 - 2.0 + 0.25, 1.0 + 0.25])))


def test_defer_routes_whole_sequences_and_holds_during_generation():
    editor = make("defer")
    editor.edit(*EDITS[0])
    layer = editor.layer
    tok = editor.tokenizer
    # a hand-set classifier: accept a sequence iff the last token's first input is > 0
    with torch.no_grad():
        layer.gate_weight.zero_()
        layer.gate_weight[0] = 100.0
        layer.gate_bias.zero_()
    prompts = [EDITS[0][0], EDITS[2][0], UNRELATED, EDITS[3][0]]
    accepted = [index == 0 for index in editor.routed(prompts)]
    assert True in accepted and False in accepted  # both branches are exercised
    batch = tok(prompts, return_tensors="pt", padding=True)
    x, out = layer_io(editor, batch)
    base = layer.base_layer(x)
    head = layer._head(x, layer.params())
    for row, accept in enumerate(accepted):
        expected = head[row] if accept else base[row]
        assert torch.equal(out[row], expected.to(out.dtype))
    decisions = []
    original = layer.route
    layer.route = lambda *args: decisions.append(1) or original(*args)
    editor.generate(**batch, max_new_tokens=3, do_sample=False)
    del layer.route
    assert len(decisions) == 1  # decided at prefill, held for every new token
