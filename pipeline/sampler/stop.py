"""Stop strings (`sampler.stop`): a completion ends where one of them first appears in its text.

The samplers check a row each time it finishes a canvas (DiffusionGemma) or a block (LLaDA, Dream): a row
whose text holds a stop string leaves the batch there, with finish_reason "stop", instead of denoising the
canvases or blocks that would follow. Its tokens are cut after the one that completes the stop string, and
its text (pipeline/generation.py) before the stop string, which is not part of the output (as vLLM's
`stop` without `include_stop_str_in_output`).

Text is decoded exactly as the output's `completion` column is (special tokens skipped), so that a stop string
matches the text the user reads. Each check decodes the row's tokens so far: a canvas of 256 tokens every few
dozen decoder passes, negligible beside the passes themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class StopStrings:
    """`decode(token_ids) -> text` decodes as the output does. Called with a row's tokens, returns how many
    leading tokens to keep (the fewest whose text holds a stop string), or None when the text holds none."""

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        if not stops:
            raise ValueError("StopStrings needs at least one stop string")
        self.stops = tuple(stops)
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
        if not tokens or self.find(self.decode(tokens)) is None:
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
