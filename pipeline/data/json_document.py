"""Is a file one JSON document (an array, an object over several lines) rather than JSON Lines?

The readers ask when a file's first line is not an object. The answer must not cost what the file costs to parse:
json.loads of the whole file took ~2.5x its size in memory, and a walk of its values in Python ran at 4 MB/s, so
a user who pointed a job at a multi-GB JSON array waited minutes to be told. This check reads the text in blocks
with one regex (strings become '@') and string methods (scalars become '0', whitespace goes); what remains must
be JSON's punctuation, no value may follow another without a comma (nor a comma stand where no value does), and
the brackets must nest into one container that ends with the text. Keys and the spelling of scalars are not
checked: text whose structure is one container is not JSON Lines whatever its details.

Memory stays at a few blocks whatever the lines' lengths, except that a string or a scalar cut by a block's end
is carried into the next block whole (a string of many megabytes is held once).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A JSON string, its loop unrolled (twice as fast in `re`); strings never span lines (no raw newline in one). It
# never starts at an escaped quote: else, for a string left open at a block's end, the substitution tried again from
# each escaped quote in it, each try reading to the end (37 s for a 179 KB string of embedded JSON).
STRING = re.compile(r'"(?<!\\")[^"\\\n]*(?:\\.[^"\\\n]*)*"')
SPACE = " \t\r\n"  # JSON's whitespace
# Numbers, true, false, null, and NaN and Infinity as Python's json writes and reads them (spelling not checked).
SCALAR_CHARS = "0123456789+-.eEtruefalsnNIiy"
TO_ZERO = str.maketrans(dict.fromkeys(SCALAR_CHARS, "0"))
NO_SPACE = str.maketrans(dict.fromkeys(SPACE))
NOT_JSON = str.maketrans(dict.fromkeys(SPACE + "@0,:[]{}"))  # what is left of valid text: nothing
BRACKETS_OF = str.maketrans(dict.fromkeys("@0,:"))  # of text without whitespace
SPACED_SCALARS = re.compile(r"0[ \t\r\n]+0")  # two scalars without a comma (before they are merged)
# Pairs of neighbours (whitespace removed) never in JSON: a value right after a value (a comma missing), a comma or
# colon where no value was, a '{' followed by anything but a key string or '}'.
MISPLACED = tuple(
    [a + b for a in "@0]}" for b in "@0[{"]
    + [a + b for a in "[{,:" for b in ",:"]
    + [a + b for a in ",:" for b in "]}"]
    + ["{0", "{[", "{{"]
)
OPENER = {"]": "[", "}": "{"}
MAX_DEPTH = 1000  # brackets open at once: as deep as json reads (deeper, it raises RecursionError)


def document_kind(blocks: Iterable[str]) -> str:
    """'list' or 'dict': the container that the text in `blocks` (cut anywhere) is on its own; ValueError where the
    text is not one JSON container (e.g. JSON Lines, a scalar, several values, a bracket left open)."""
    scan = _Scan()
    for block in blocks:
        scan.feed(block)
    scan.feed("", final=True)
    if scan.kind is None or not scan.ended:
        raise ValueError("no complete JSON container")
    return scan.kind


class _Scan:
    def __init__(self) -> None:
        self.kind: str | None = None
        self.ended = False
        self.open: list[str] = []  # the brackets not closed yet, the document's own one first
        self.tail = ""  # the last character seen that is not whitespace, and a space if whitespace followed
        self.carry = ""  # the text of a string or scalar cut by the end of the text seen so far
        self.pending: list[str] = []
        self.pending_size = 0

    def feed(self, block: str, final: bool = False) -> None:
        self.pending.append(block)
        self.pending_size += len(block)
        if not final and self.pending_size < len(self.carry):
            return  # a long string or scalar: wait for as much text again, so that it is rescanned O(1) times
        text = self.carry + "".join(self.pending)
        self.carry, self.pending, self.pending_size = "", [], 0
        rest = STRING.sub("@", text)
        quote = rest.find('"')
        # A quote that STRING left opens a string that runs to the end of the text: the match tried there failed,
        # so no unescaped quote follows it, so every match after it fails too (one from a later, escaped quote
        # reads on from the same point as the one from the first). The text after it is the same in `rest`.
        if quote >= 0:
            if final or "\n" in rest[quote:]:
                raise ValueError("a string not closed on its line")
            self.carry, rest = text[len(text) - (len(rest) - quote) :], rest[:quote]
        elif not final:  # a scalar at the end may go on in the next block
            cut = len(rest.rstrip(SCALAR_CHARS))
            if cut < len(rest):
                self.carry, rest = text[cut - len(rest) :], rest[:cut]
        self._structure(rest.translate(TO_ZERO))

    def _structure(self, rest: str) -> None:
        """Checks `rest` (strings '@', scalar characters '0') with the tail of the text before it."""
        seen = self.tail + rest
        self.tail = _tail(seen)
        if seen.translate(NOT_JSON) or SPACED_SCALARS.search(seen):
            raise ValueError("not JSON")
        compact = seen.translate(NO_SPACE)
        while "00" in compact:  # a scalar's characters: one value
            compact = compact.replace("00", "0")
        if any(pair in compact for pair in MISPLACED):
            raise ValueError("not one JSON value")
        new = rest.translate(NO_SPACE)
        if not new:
            return
        if self.ended:
            raise ValueError("more than one JSON value")
        if self.kind is None:
            if new[0] not in "[{":
                raise ValueError("not a JSON container")
            self.kind = "list" if new[0] == "[" else "dict"
        brackets = new.translate(BRACKETS_OF)
        stack, last = self.open, len(brackets) - 1
        for at, bracket in enumerate(brackets):  # ~1 bracket in 10 characters of typical data: fast enough
            if bracket in "[{":
                stack.append(bracket)
                if len(stack) > MAX_DEPTH:
                    raise ValueError("nested too deeply")
            elif not stack or stack.pop() != OPENER[bracket]:
                raise ValueError("unbalanced brackets")
            elif not stack:  # the document closed: by the text's last bracket, with nothing after it
                if at < last or new[-1] != bracket:
                    raise ValueError("more than one JSON value")
                self.ended = True


def _tail(text: str) -> str:
    """The last character of `text` that is not whitespace ('' for none), and a space if whitespace follows it."""
    end = len(text.rstrip(SPACE))
    return text[end - 1 : end] + (" " if end < len(text) else "") if end else ""
