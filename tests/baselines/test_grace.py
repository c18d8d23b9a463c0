"""GRACE: the codebook's rules on hand-made vectors, the last token of a hit replaced,
generation from the codebook, retraction."""

import torch
from conftest import EDITS, tiny_model
from editors import UNRELATED, greedy, layer_io, make, unedited

from wise_edit.baselines import Codebook, GraceConfig, GraceEditor


def _book():
    return Codebook(key_dim=2, value_dim=3, device=torch.device("cpu"))


def test_codebook_first_key_and_far_key_are_added():
    book = _book()
    first = book.place(torch.tensor([0.0, 0.0]), "Paris", epsilon_init=1.0)
    assert (first.action, first.index, first.radius) == ("add", 0, 1.0)
    assert len(book) == 0  # placing decides; nothing changes before apply
    book.apply(first, torch.tensor([0.0, 0.0]), "Paris", torch.ones(3))
    far = book.place(torch.tensor([3.0, 0.0]), "Rome", epsilon_init=1.0)  # 3 > 1 + 1
    assert (far.action, far.index, far.radius) == ("add", 1, 1.0)
    book.apply(far, torch.tensor([3.0, 0.0]), "Rome", 2 * torch.ones(3))
    assert book.radii.tolist() == [1.0, 1.0] and book.labels == ["Paris", "Rome"]


def test_codebook_same_label_expands_the_radius_and_retrains_the_value():
    book = _book()
    book.apply(book.place(torch.zeros(2), "Paris", 1.0), torch.zeros(2), "Paris", torch.ones(3))
    near = book.place(torch.tensor([1.5, 0.0]), "Paris", epsilon_init=1.0)  # 1.5 <= 1 + 1
    assert (near.action, near.index, near.radius) == ("expand", 0, 1.5)
    book.apply(near, torch.tensor([1.5, 0.0]), "Paris", 5 * torch.ones(3))
    assert len(book) == 1 and book.radii.tolist() == [1.5]
    assert book.values[0].tolist() == [5.0, 5.0, 5.0]
    inside = book.place(torch.tensor([0.5, 0.0]), "Paris", epsilon_init=1.0)
    assert (inside.action, inside.radius) == ("expand", 1.5)  # never shrinks


def test_codebook_conflicting_label_splits_both_radii():
    book = _book()
    book.apply(book.place(torch.zeros(2), "Paris", 1.0), torch.zeros(2), "Paris", torch.ones(3))
    clash = book.place(torch.tensor([0.0, 1.2]), "Rome", epsilon_init=1.0)
    assert (clash.action, clash.index, clash.nearest) == ("split", 1, 0)
    book.apply(clash, torch.tensor([0.0, 1.2]), "Rome", 2 * torch.ones(3))
    torch.testing.assert_close(book.radii, torch.tensor([0.6, 0.6]))
    index, hit = book.lookup(torch.tensor([[0.0, 0.5], [0.0, 0.7], [5.0, 5.0]]))
    assert index.tolist()[:2] == [0, 1] and hit.tolist() == [True, True, False]


def test_grace_replaces_only_the_last_token_of_a_hit():
    editor = make("grace")
    prompt, target = EDITS[0]
    editor.edit(prompt, target)
    assert editor.routed([prompt, UNRELATED]) == [0, -1]
    layer = editor.layer
    x, out = layer_io(editor, editor.tokenizer([prompt], return_tensors="pt"))
    base = layer.base_layer(x)
    assert torch.equal(out[0, :-1], base[0, :-1])
    assert torch.equal(out[0, -1], layer.codebook.values[0])


def test_grace_generation_uses_the_codebook():
    editor = make("grace", max_steps=60)
    prompt, target = EDITS[1]
    editor.edit(prompt, target)
    batch = editor.tokenizer([prompt], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=1, do_sample=False)
    first = editor.tokenizer(" " + target, add_special_tokens=False)["input_ids"][0]
    assert out[0, -1].item() == first


def test_grace_retraction_equals_a_stream_without_the_edit(tokenizer):
    config = GraceConfig(layer=2, max_steps=15, epsilon_init=1.0)
    editor = GraceEditor(tiny_model(), tokenizer, config)
    editor.edit_many(EDITS[:4])
    editor.retract(2)
    never = GraceEditor(tiny_model(), tokenizer, config)
    never.edit_many([EDITS[i] for i in (0, 1, 3)])
    assert torch.equal(editor.codebook.keys, never.codebook.keys)
    assert torch.equal(editor.codebook.values, never.codebook.values)
    for p, _ in EDITS[:4]:
        assert greedy(editor, tokenizer, p) == greedy(never, tokenizer, p)
    assert greedy(editor, tokenizer, EDITS[2][0]) == unedited(tokenizer, EDITS[2][0])
