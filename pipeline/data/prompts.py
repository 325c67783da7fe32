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


# A rendered prompt longer than this many characters per allowed token cannot fit: no token covers more
# characters than the tokenizer's longest token string, and normalisation shrinks text by less than 4x.
CHARS_BOUND_FACTOR = 4


class PromptTooLong(ValueError):
    """The rendered prompt has more characters than `max_chars`; it was not tokenized."""

    def __init__(self, chars: int, max_chars: int) -> None:
        super().__init__(f"the rendered prompt has {chars} characters, more than {max_chars}")
        self.chars, self.max_chars = chars, max_chars


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the tokenizer's longest token string (byte tokens such as <0x0A> count as written)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def prompt_ids(
    tokenizer: Any, prompt: str, *, is_chat: bool, apply_chat_template: bool, max_chars: int | None = None
) -> list[int]:
    """Token ids of the rendered prompt; raises PromptTooLong before tokenizing a text over `max_chars`
    characters (a megabyte row would hold a worker for minutes only to be rejected)."""
    text = render_prompt(tokenizer, prompt, is_chat=is_chat, apply_chat_template=apply_chat_template)
    if max_chars is not None and len(text) > max_chars:
        raise PromptTooLong(len(text), max_chars)
    templated = is_chat or (apply_chat_template and has_chat_template(tokenizer))
    # A rendered template already holds its special tokens (BOS); a raw prompt gets the tokenizer's own.
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
