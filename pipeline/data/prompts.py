"""Prompt text -> token ids: chat messages (or a plain prompt as one user turn) through the tokenizer's chat
template, or the raw prompt when the tokenizer has no template or templating is off."""

from __future__ import annotations

import json
from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: str, *, is_chat: bool, apply_chat_template: bool) -> str:
    """The exact text the model is conditioned on."""
    if is_chat:
        if not has_chat_template(tokenizer):
            raise ValueError("chat messages need a tokenizer with a chat template, and this model's has none")
        messages = json.loads(prompt)
    elif apply_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
    else:
        return prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, prompt: str, *, is_chat: bool, apply_chat_template: bool) -> list[int]:
    text = render_prompt(tokenizer, prompt, is_chat=is_chat, apply_chat_template=apply_chat_template)
    templated = is_chat or (apply_chat_template and has_chat_template(tokenizer))
    # A rendered template already holds its special tokens (BOS); a raw prompt gets the tokenizer's own.
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
