"""Prompt text -> token ids: chat messages (or a plain prompt as one user turn) through the tokenizer's chat
template, or the raw prompt when the tokenizer has no template or templating is off; and the prompt template
(`data.prompt_template`) that builds a prompt from a row's columns."""

from __future__ import annotations

import json
import string
from typing import Any


def template_fields(template: str) -> list[str]:
    """The column names `template` (a str.format string, `{column}` fields, `{{`/`}}` for braces) fills, in
    order, each once; ValueError saying what is wrong with it otherwise."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(
            f"is not a valid template ({e}); write {{column}} for a column, {{{{ for a brace"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise ValueError("has a positional field ({} or {0}); name the column: {question}")
        if any(c in name for c in ".[]") or spec or conversion:
            raise ValueError(
                f"has the field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}; "
                "fields are plain column names, {column}, without attributes, indexes or formats"
            )
        if name not in fields:
            fields.append(name)
    if not fields:
        raise ValueError(
            "names no column; write the columns to fill as {column}, e.g. 'Question: {question}'"
        )
    return fields


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(
    tokenizer: Any, prompt: str, *, is_chat: bool, apply_chat_template: bool, system_prompt: str | None = None
) -> str:
    """The exact text the model is conditioned on. `system_prompt`: a system turn before the prompt's (a chat
    that starts with its own system message keeps that one); it needs the chat template."""
    if is_chat:
        if not has_chat_template(tokenizer):
            raise ValueError("chat messages need a tokenizer with a chat template, and this model's has none")
        messages = json.loads(prompt)
    elif apply_chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
    else:
        return prompt
    if system_prompt is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# How check_system_prompt names the settings: the job's config keys, or the Python API's keywords (LLM).
JOB_NAMES = {
    "system_prompt": "data.system_prompt",
    "templating_off": "apply_chat_template",
    "instead": "put the instructions in the prompt (data.prompt_template)",
}
API_NAMES = {
    "system_prompt": "system_prompt",
    "templating_off": "apply_chat_template=False",
    "instead": "put the instructions in each prompt, or give chats with their own system message",
}


def check_system_prompt(
    tokenizer: Any, system_prompt: str | None, apply_chat_template: bool, names: dict[str, str] = JOB_NAMES
) -> None:
    """ValueError when `system_prompt` cannot be applied to this model's prompts: templating is off, the
    tokenizer has no chat template, or its template refuses a system turn (some do)."""
    if system_prompt is None:
        return
    key = names["system_prompt"]
    if not apply_chat_template or not has_chat_template(tokenizer):
        why = (
            f"templating is off ({names['templating_off']})"
            if not apply_chat_template
            else "this model's tokenizer has none"
        )
        raise ValueError(f"{key} is a system turn of the chat template, and {why}")
    marker = "canvasflow system turn check"
    try:
        text = render_prompt(tokenizer, "x", is_chat=False, apply_chat_template=True, system_prompt=marker)
    except Exception as e:  # noqa: BLE001 - the template's own error, reported whole
        problem = f"refuses a system turn ({e})"
    else:
        problem = None if marker in text else "drops system turns (the rendered prompt does not hold it)"
    if problem:
        raise ValueError(
            f"{key}: this model's chat template {problem}; leave {key} unset and {names['instead']}"
        )


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
    tokenizer: Any,
    prompt: str,
    *,
    is_chat: bool,
    apply_chat_template: bool,
    max_chars: int | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of the rendered prompt; raises PromptTooLong before tokenizing a text over `max_chars`
    characters (a megabyte row would hold a worker for minutes only to be rejected)."""
    text = render_prompt(
        tokenizer,
        prompt,
        is_chat=is_chat,
        apply_chat_template=apply_chat_template,
        system_prompt=system_prompt,
    )
    if max_chars is not None and len(text) > max_chars:
        raise PromptTooLong(len(text), max_chars)
    templated = is_chat or (apply_chat_template and has_chat_template(tokenizer))
    # A rendered template already holds its special tokens (BOS); a raw prompt gets the tokenizer's own.
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
