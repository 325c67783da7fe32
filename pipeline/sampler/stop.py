"""Stop strings (`sampler.stop`): a completion ends where one of them first appears in its text.

The samplers check a row each time it finishes a canvas (DiffusionGemma) or a block (LLaDA, Dream): a row
whose text holds a stop string leaves the batch there, with finish_reason "stop", instead of denoising the
canvases or blocks that would follow. Its tokens are cut after the one that completes the stop string, and
its text (pipeline/generation.py) before the stop string, which is not part of the output (as vLLM's
`stop` without `include_stop_str_in_output`).

Text is decoded exactly as the output's `completion` column is (special tokens skipped), so that a stop string
matches the text the user reads. Each check decodes the row's tokens so far: a canvas of 256 tokens every few
dozen decoder passes, negligible beside the passes themselves.

A stop string that is a special token of the tokenizer ("<end_of_turn>", "<|eot_id|>") is never in that text:
it is matched as its token id instead, and the row ends at that token (kept in the tokens, as vLLM keeps a stop
token id; its text is empty). One that holds a special token among other text could never match: refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

MAX_STOPS = 16  # stop strings per job
MAX_STOP_CHARS = 200  # characters per stop string


def check_stops(stops: Any, key: str = "sampler.stop") -> tuple[str, ...]:
    """The stop strings of a setting (None, a string, or a list of non-empty strings); ValueError naming the
    bad one."""
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = [stops]
    elif not isinstance(stops, (list, tuple)):
        raise ValueError(f"{key}={stops!r} must be a string or a list of strings")
    stops = list(stops)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"{key} has {len(stops)} strings; at most {MAX_STOPS}")
    for i, stop in enumerate(stops):
        if isinstance(stop, (int, float)) and not isinstance(stop, bool):
            raise ValueError(f"{key}[{i}]={stop!r} must be a non-empty string: quote it, {key}=['{stop}']")
        if not isinstance(stop, str) or not stop:
            raise ValueError(f"{key}[{i}]={stop!r} must be a non-empty string")
        if len(stop) > MAX_STOP_CHARS:
            raise ValueError(f"{key}[{i}] has {len(stop)} characters; at most {MAX_STOP_CHARS}")
    return tuple(stops)


def escape_hint(stops: Sequence[str], key: str = "sampler.stop") -> str | None:
    """What to tell the user when a stop string holds a backslash escape written out (Hydra's command line
    keeps `\\n` as two characters): it matches only that text, not a newline or tab."""
    for i, stop in enumerate(stops):
        if "\\n" in stop or "\\t" in stop:
            return (
                f"{key}[{i}]={stop!r} holds a backslash and a letter, not a newline or tab (the command line keeps "
                "escapes as written); to stop at a newline, set the string in a config file in double quotes "
                "(stop: [\"\\n\\n\"]), or type the newline in the shell ($'\\n')"
            )
    return None


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """The special tokens that decoding with skip_special_tokens=True leaves out, by text, with their ids."""
    candidates = {token.content: i for i, token in tokenizer.added_tokens_decoder.items()}
    candidates.update(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True))
    return {
        text: i
        for text, i in candidates.items()
        if text and tokenizer.decode([i], skip_special_tokens=True) == ""
    }


def stop_token_ids(stops: Sequence[str], tokenizer: Any, key: str = "sampler.stop") -> dict[str, int]:
    """The stop strings that are special tokens of `tokenizer`, with their ids: completions are decoded
    without special tokens, so these are matched by id. ValueError naming a stop string that holds a special
    token among other text, which could match neither way."""
    specials = special_tokens(tokenizer)
    found = {}
    for i, stop in enumerate(stops):
        if stop in specials:
            found[stop] = specials[stop]
            continue
        inside = sorted((t for t in specials if t in stop), key=stop.index)
        if inside:
            raise ValueError(
                f"{key}[{i}]={stop!r} holds the special token {inside[0]!r}, which is not in a completion's "
                f"text (decoded without special tokens), so it never matches: give {inside[0]!r} as a stop "
                "string of its own (a completion then ends at that token), and the text before it as another"
            )
    return found


class StopStrings:
    """`decode(token_ids) -> text` decodes as the output does. Called with a row's tokens, returns how many
    leading tokens to keep (the fewest whose text holds a stop string, or up to and including the first stop
    token), or None when there is none. `token_ids`: the stop strings that are special tokens (stop_token_ids),
    matched by id."""

    def __init__(
        self,
        stops: Sequence[str],
        decode: Callable[[list[int]], str],
        token_ids: Mapping[str, int] | None = None,
    ) -> None:
        token_ids = token_ids or {}
        if not stops:
            raise ValueError("StopStrings needs at least one stop string")
        self.stops = tuple(stop for stop in stops if stop not in token_ids)  # matched in the text
        self.token_ids = frozenset(token_ids[stop] for stop in stops if stop in token_ids)
        self.decode = decode

    def find(self, text: str) -> int | None:
        """Where the first stop string in `text` starts, or None."""
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return min(found) if found else None

    def cut(self, text: str) -> str:
        """`text` up to its first stop string (excluded)."""
        at = self.find(text)
        return text if at is None else text[:at]

    def __call__(self, tokens: list[int]) -> int | None:
        token = (
            next((i for i, t in enumerate(tokens) if t in self.token_ids), None) if self.token_ids else None
        )
        if token is not None:  # a stop string in the text before the stop token ends the row earlier
            return self._in_text(tokens[:token]) or token + 1
        return self._in_text(tokens)

    def _in_text(self, tokens: list[int]) -> int | None:
        if not tokens or not self.stops or self.find(self.decode(tokens)) is None:
            return None
        # The fewest leading tokens whose text holds a stop string: text only grows as tokens are added.
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if self.find(self.decode(tokens[:middle])) is None:
                low = middle + 1
            else:
                high = middle
        return low
