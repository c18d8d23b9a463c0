"""How a chat request becomes the text the model continues: the one place to change when
the editor gets its own prompt format (chat-formatted edits), so that chat answers and
edits are formatted alike."""

from __future__ import annotations

from typing import Any


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The prompt text of ``messages`` and whether the tokenizer must still add its
    special tokens: the tokenizer's chat template when it has one (the template writes
    them), else ``role: content`` lines and an ``assistant:`` cue."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text), False
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"]), True
