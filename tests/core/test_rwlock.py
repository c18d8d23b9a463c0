"""Concurrent calls: each keeps its own routing decision, and an edit training in another
thread is invisible until it commits."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import EDITS, fast_config, tiny_model

from wise_edit import WiseEditor

UNRELATED = "Please remember to close the door when you leave the room."  # routed to none


def _answer(editor, tokenizer, prompt: str) -> list[int]:
    batch = tokenizer([prompt], return_tensors="pt")
    out = editor.generate(**batch, max_new_tokens=8, do_sample=False)
    return out[0, batch["input_ids"].shape[1] :].tolist()


def _editor(tokenizer) -> WiseEditor:
    # the paper's SGD: on this tiny random model it separates the unrelated prompt from
    # the memories within 20 steps, which the test needs for three different routes
    config = fast_config(
        mode="retrieve", shard_size=1, shards_per_merge=2, max_steps=20, optimizer="sgd"
    )
    editor = WiseEditor(tiny_model(), tokenizer, config)
    editor.edit_many(EDITS[:4])
    return editor


def test_concurrent_requests_keep_their_own_memory(tokenizer):
    editor = _editor(tokenizer)
    prompts = [p for p, _ in EDITS[:4]] + [UNRELATED]
    assert set(editor.routed(prompts)) == {0, 1, -1}  # three different routes
    sequential = {p: _answer(editor, tokenizer, p) for p in prompts}
    jobs = prompts * 6
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda p: _answer(editor, tokenizer, p), jobs))
    for prompt, answer in zip(jobs, answers):
        assert answer == sequential[prompt], prompt


def test_each_thread_reads_back_the_decision_its_own_generation_used(tokenizer):
    editor = _editor(tokenizer)
    prompts = [p for p, _ in EDITS[:4]] + [UNRELATED]
    routed = dict(zip(prompts, editor.routed(prompts)))

    def answer_and_decision(prompt: str) -> tuple[str, list[int] | None]:
        _answer(editor, tokenizer, prompt)
        return prompt, editor.last_decision()

    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(answer_and_decision, prompts * 4))
    for prompt, decision in results:
        assert decision == [routed[prompt]], prompt


def test_an_edit_is_invisible_until_it_commits(tokenizer):
    editor = _editor(tokenizer)
    prompts = [p for p, _ in EDITS] + [UNRELATED]
    before = {p: _answer(editor, tokenizer, p) for p in prompts}
    done = threading.Event()
    seen: list[tuple[str, list[int]]] = []

    def serve() -> None:
        while not done.is_set():
            for p in prompts:
                seen.append((p, _answer(editor, tokenizer, p)))

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        editor.edit(*EDITS[5])
    finally:
        done.set()
        for t in threads:
            t.join()
    after = {p: _answer(editor, tokenizer, p) for p in prompts}
    assert after[EDITS[5][0]] != before[EDITS[5][0]]  # the edit changes an answer
    assert len(seen) >= len(prompts)
    for prompt, answer in seen:
        assert answer in (before[prompt], after[prompt]), prompt
