"""The values of input rows, checked and written as JSON: a prompt's text, chat messages (their content a
string or OpenAI text parts, their other keys kept for the chat template), a column's value as
data.prompt_template writes it, and any value as the records' JSON. A check returns (text, None) or
(None, reason), the reason an error row's; the Python API's prompts (check_prompt_value) get the same checks.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import numpy as np


class NotText(TypeError):
    """A binary value (bytes, e.g. of a Parquet binary column) that is not UTF-8 text, or an object without a
    text form of its own (str() would name its memory address: another text in every process), which JSON
    cannot hold. `error`: the decoding error, or what the value is."""

    def __init__(self, error: UnicodeDecodeError | str) -> None:
        if isinstance(error, UnicodeDecodeError):
            error = f"binary data that is not UTF-8 text (byte {error.start} of the value)"
        super().__init__(error)


def _text_default(value: Any) -> Any:
    """JSON for a value json has no type for: bytes as their UTF-8 text (NotText where they are not one), the
    others (dates, decimals) as str()."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NotText(e) from None
    kind = type(value)
    if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
        raise NotText(f"a {kind.__name__} object, which has no text form (str() gives its memory address)")
    return str(value)


def _lossy_default(value: Any) -> Any:
    """As _text_default, bytes that are not UTF-8 with their bad bytes replaced: for showing a row."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


@functools.lru_cache(maxsize=8)
def _encoder(default: Callable[[Any], Any]) -> json.JSONEncoder:
    """The encoder json.dumps(ensure_ascii=False, sort_keys=True, default=default, allow_nan=False) makes on
    every call, made once: its encode() is what dumps returns (and keeps no state between calls)."""
    return json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=default, allow_nan=False)


def to_json(value: Any, default: Callable[[Any], Any] = _text_default) -> str:
    """Strict JSON text: NaN and +-Infinity (which JSON has no spelling for) are written as null."""
    encode = _encoder(default).encode
    try:
        return encode(value)
    except ValueError:  # a non-finite float somewhere
        return encode(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


SURROGATE_HINT = "not valid UTF-8 (it holds a lone surrogate such as \\ud800, e.g. half of an escaped emoji)"
# What a text that shows nothing may hold: whitespace, NUL (fixed-width exports pad with it) and the zero-width
# characters (a byte-order mark, a space or joiner of zero width), which str.strip() keeps.
INVISIBLE = "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "\x00\u200b\u200c\u200d\u2060\ufeff"


def check_text(value: Any, what: str, *, allow_blank: bool = False) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason); a blank text is a reason unless `allow_blank`."""
    if value is None:
        return None, f"{what} is null"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{what} is not valid UTF-8 (byte {e.start})"
    if not isinstance(value, str):
        return None, f"{what} must be a string, got {type(value).__name__}"
    if has_surrogate(value):
        return None, f"{what} is {SURROGATE_HINT}"
    if not allow_blank and (problem := blank_problem(value, what)):
        return None, problem
    return value, None


def blank_problem(text: str, what: str) -> str | None:
    """Why `text` (a prompt, an id) shows nothing: empty or whitespace, or only NUL and zero-width characters
    (which str.strip() keeps); None when it shows something."""
    if text.strip(INVISIBLE):
        return None
    if not text.strip():
        return f"{what} is empty"
    return f"{what} is blank: it holds only {ascii(text)[1:-1][:60]} (NUL or zero-width characters)"


def check_messages(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, str):  # e.g. a column of json.dumps(messages): its text is not parsed
        return None, (
            "messages must be a non-empty list of {role, content} objects, got a string (JSON text is not "
            "parsed: store the messages as a list of objects, or give the text in data.prompt_column)"
        )
    if not isinstance(value, list) or not value:
        return None, "messages must be a non-empty list of {role, content} objects"
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, f"messages[{i}] must be an object with a string 'role'"
        role = message["role"]
        if has_surrogate(role):
            return None, f"messages[{i}].role is {SURROGATE_HINT}"
        content = message.get("content")
        # Most messages: {role, content} and a string of text, which the checks below would keep as it is.
        if (
            len(message) == 2
            and type(content) is str
            and not has_surrogate(content)
            and content.strip(INVISIBLE)
        ):
            messages.append({"role": role, "content": content})
            continue
        calls = message.get("tool_calls")
        content, problem = _check_content(
            content,
            f"messages[{i}].content",
            tool_calls=isinstance(calls, (list, tuple)) and len(calls) > 0,
        )
        if problem:
            return None, problem
        fields, problem = _other_fields(message, f"messages[{i}]")
        if problem:
            return None, problem
        messages.append({**fields, "role": role, "content": content})  # binary content as its text
    return to_json(messages), None


def _other_fields(message: dict[Any, Any], what: str) -> tuple[dict[str, Any], str | None]:
    """The message's keys besides role and content (name, tool_calls, tool_call_id, ...), for the chat
    template as given; a null one is no key (a Parquet message struct has every message's fields, null where
    it has none). Or ({}, reason) for a value the records' JSON cannot hold."""
    fields = {}
    for key, value in message.items():
        if key in ("role", "content") or value is None:
            continue
        if not isinstance(key, str) or has_surrogate(key):
            return (
                {},
                f"{what} has the key {valid_text(repr(key))}, which is not a valid JSON key (a string)",
            )
        where = f"{what}.{key}"
        try:
            text = to_json(value)
        except NotText as e:
            return {}, f"{where} holds {e}; give it as text"
        except RecursionError:
            return {}, f"{where} is nested too deeply to store as JSON; flatten it"
        except (TypeError, ValueError) as e:
            return {}, f"{where} is not JSON data ({e})"
        if has_surrogate(text):
            return {}, f"{where} is {SURROGATE_HINT}"
        fields[key] = value
    return fields, None


# How the text parts of a message's content are joined: as vLLM's OpenAI-compatible server does for a chat
# template that takes string content (the OpenAI API leaves it unspecified; a multimodal template that loops
# over the parts writes them with nothing between, which would run "Hi" and "there" together).
PARTS_SEPARATOR = "\n"
TEXT_PART = '{"type": "text", "text": "..."}'
# The content the chat template gets for a tool-call message without text, not None: transformers drops a
# None key before rendering, and DeepSeek-V3/R1's templates then fail on `'<｜Assistant｜>' + message['content']`
# (their `content is none` branch renders what "" renders); Llama 4's and Qwen's render "" as no content.
TOOL_CALL_CONTENT = ""


def _check_content(value: Any, what: str, *, tool_calls: bool = False) -> tuple[str | None, str | None]:
    """A message's content: a string, or a list of OpenAI-format text parts, their texts joined into one.
    With `tool_calls` (a non-empty list of them) it may hold no text: null or absent, as in OpenAI's
    {"role": "assistant", "content": null, "tool_calls": [...]}, or no parts, is "" (TOOL_CALL_CONTENT)."""
    if tool_calls and (value is None or (isinstance(value, (list, tuple)) and not value)):
        return TOOL_CALL_CONTENT, None
    if not isinstance(value, (list, tuple)):
        return check_text(value, what, allow_blank=tool_calls)
    if not value:
        return (
            None,
            f"{what} is an empty list of parts; give the text as a string or as text parts, {TEXT_PART}",
        )
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            got = (
                "an object without a string 'type'"
                if isinstance(part, dict)
                else ("null" if part is None else f"a {type(part).__name__}")
            )
            return None, f"{what}[{j}] is {got}; a content part is an object such as {TEXT_PART}"
        if kind != "text":
            return None, (
                f"{what}[{j}] is a part of type {valid_text(kind)!r}; only text parts ({TEXT_PART}) are "
                "supported: drop the other parts from the input, or give what they hold as text"
            )
        text, problem = check_text(part.get("text"), f"{what}[{j}].text", allow_blank=True)
        if problem:
            return None, problem
        texts.append(text)
    return check_text(PARTS_SEPARATOR.join(texts), what, allow_blank=tool_calls)


def check_prompt_value(value: Any) -> tuple[str | None, bool, str | None]:
    """A prompt as the Python API takes it (a string, or a chat: a list of {role, content} messages), checked
    as the readers check an input row's: (text, is_chat, None), the chat as the JSON text rows carry, or
    (None, is_chat, reason)."""
    if isinstance(value, (list, tuple)):
        text, problem = check_messages(list(value))
        return text, True, problem
    text, problem = check_text(value, "prompt")
    return text, False, problem


FLOAT32_MAX = float(np.finfo(np.float32).max)


def template_value(value: Any, name: str) -> tuple[str | None, str | None]:
    """(text, None): column `name`'s value as data.prompt_template writes it; or (None, reason)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"column {name!r} is {value} (not a finite number); data.prompt_template needs a value"
    if isinstance(value, float) and abs(value) <= FLOAT32_MAX and float(np.float32(value)) == value:
        short = str(np.float32(value))  # a float32 column's 0.1, not 0.1000000015
        # ... but not for a whole number that repr writes in full and the short text is another number of:
        # 1099511627776.0 (2**40, a float64 column's or JSON's) was written 1.0995116e+12.
        if not (value.is_integer() and abs(value) < 1e16 and float(short) != value):
            return min(repr(value), short, key=len), None
    if isinstance(value, (bool, int, float, Decimal)):  # Decimal: a Parquet decimal column's, "1.50"
        return str(value), None
    if not isinstance(value, (str, bytes)):
        kind = "null" if value is None else f"a {type(value).__name__}"
        return None, f"column {name!r} is {kind}; data.prompt_template fills strings and numbers"
    return check_text(value, f"column {name!r}", allow_blank=True)  # blank values are allowed


def valid_text(text: str) -> str:
    """`text` with lone surrogates escaped (\\ud800), so that it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if has_surrogate(text) else text


def safe_json(value: Any) -> str:
    try:
        return to_json(value, _lossy_default)
    except RecursionError:
        return "<nested too deeply to show>"


def binary_problem(extra: dict[str, Any]) -> str:
    """Why the columns `extra`, one of which holds bytes that are not UTF-8 text, cannot be metadata."""
    for name, value in extra.items():
        try:
            to_json(value)
        except NotText as e:
            return (
                f"column {name!r} holds {e}, which the JSON of the metadata column cannot hold; leave the "
                "column out (data.metadata_columns lists the columns to carry) or encode its values as text "
                "(e.g. base64) in the input"
            )
        except RecursionError:
            continue
    return "the other columns hold binary data that is not UTF-8 text"
