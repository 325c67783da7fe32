"""JSON Lines files as input: (row dict | None, error | None, raw text) per non-blank line, a file at a time.

A line that is not a JSON object (malformed, invalid UTF-8, a duplicate key, an array) is that row's error.
A file as a whole that is not JSON Lines is an InputError naming it and the fix: one JSON document (an array,
a pretty-printed object; pipeline/data/json_document.py tells), no line an object, UTF-16/32 text, or
compressed other than as a .gz (which is decompressed on the fly).
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator
from typing import Any

from pipeline.data.files import InputError, local_copy
from pipeline.data.json_document import document_kind
from pipeline.data.values import valid_text

UTF8_BOM = b"\xef\xbb\xbf"
# Byte-order marks of the encodings JSON Lines is not read in (UTF-32's first: it starts with UTF-16's).
OTHER_BOMS = (
    ("UTF-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")),
    ("UTF-16", (b"\xff\xfe", b"\xfe\xff")),
)
GZIP_MAGIC = b"\x1f\x8b"
# First bytes of compressed files, to name the codec of one that is read as plain text.
COMPRESSED_MAGIC = (
    ("gzip", re.compile(re.escape(GZIP_MAGIC))),
    ("zstd", re.compile(rb"\x28\xb5\x2f\xfd")),
    ("bzip2", re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)")),  # 'BZh' alone could start a text line
    ("xz", re.compile(rb"\xfd7zXZ\x00")),
)
LONG_LINE = 1 << 20  # bytes: a line this long that opens an array is refused without parsing it
RAW_KEPT = 2000  # characters of such a line kept as its error row's raw text
SCAN_BLOCK = 1 << 16  # bytes read at a time by the check that a file is one JSON document
JSONL_HINT = (
    'Each line must hold one JSON object, e.g. {"prompt": "..."}; convert a JSON array with '
    "`jq -c '.[]' in.json > in.jsonl`, or set data.format if it is another format."
)
# For a file that is one JSON object: `jq -c '.[]'` would write its values, not rows.
JSONL_HINT_OBJECT = (
    'Each line must hold one JSON object, e.g. {"prompt": "..."}. If the object is one row, write it on one '
    'line: `jq -c . in.json > in.jsonl`; if it holds the rows in an array under a key, e.g. "data": [...], '
    "write that array's objects one per line: `jq -c '.data[]' in.json > in.jsonl`. Or set data.format if it "
    "is another format."
)


def jsonl_rows(files: list[str], endpoint_url: str | None, region: str | None) -> Iterator[tuple]:
    """(row dict | None, error | None, raw text) per non-blank line.

    Files are read a line at a time (an S3 object through a temporary file on disk), so the driver holds the
    records, not the input as well. A file that is one JSON document (an array, a pretty-printed object) or
    none of whose lines is a JSON object is not JSON Lines: InputError naming it, rather than one error row
    per line. A UTF-8 byte-order mark at the start of a file is skipped; a .gz that does not decompress is an
    InputError.
    """
    for file in files:
        with local_copy(file, endpoint_url, region) as local:
            yield from _file_rows(file, local)


def _file_rows(file: str, local: str) -> Iterator[tuple]:
    name = os.path.basename(file)
    pending: list[tuple] = []  # rows before the file's first JSON object, held until one is seen
    seen_object = False
    for number, line in _lines(file, local):
        if not line.strip():
            continue
        row = _jsonl_line(line, f"{name}:{number}")
        if seen_object:
            yield row
        elif row[0] is None and not isinstance(row[1], _ObjectError):
            if not pending:
                _refuse_json_document(file, local)
            pending.append(row)
        else:
            seen_object = True
            yield from pending
            pending = []
            yield row
    if pending:
        raise InputError(
            f"{file} is not JSON Lines: none of its {len(pending)} non-blank line(s) is a JSON object "
            f"(first: {pending[0][1]}). {JSONL_HINT}"
        )


@contextlib.contextmanager
def _opened(file: str, local: str) -> Iterator[Any]:
    """The binary stream of the input file at `local` (`file` names it in errors), decompressed on the fly for
    .gz; a file compressed without the .gz name, or named .gz without being gzip, is an InputError, and so is an
    error while the body of the `with` reads the stream."""
    gz = file.lower().endswith(".gz")
    try:
        raw = open(local, "rb")  # noqa: SIM115 - closed by the with below; open errors reported apart
    except OSError as e:
        raise InputError(f"cannot read input file {file}: {e.strerror or e}") from None
    with raw:
        head = raw.read(16)
        if not head:  # an empty .jsonl.gz holds no rows, as an empty .jsonl
            yield raw
            return
        packed = next((name for name, magic in COMPRESSED_MAGIC if magic.match(head)), None)
        if not gz and packed:  # else each line would be an 'invalid UTF-8' row of binary
            fix = (
                "name it .jsonl.gz" if packed == "gzip" else "decompress it (the reader reads plain or gzip)"
            )
            raise InputError(f"{file} looks {packed}-compressed (its first bytes): {fix}")
        if gz and not head.startswith(GZIP_MAGIC):
            raise InputError(
                f"{file} is not gzip-compressed (it does not start with the gzip header); "
                "if it is plain JSON Lines, rename it without .gz"
            )
        raw.seek(0)
        try:
            yield gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        except EOFError:
            raise InputError(
                f"{file} is a truncated gzip file (the compressed data ends early, e.g. an interrupted "
                "upload or copy); copy or re-create it and check it with `gzip -t`"
            ) from None
        except (OSError, zlib.error) as e:  # gzip.BadGzipFile (CRC, length, method) is an OSError
            if not gz:
                raise InputError(f"cannot read input file {file}: {e.strerror or e}") from None
            raise InputError(
                f"{file} is a corrupt gzip file ({e}); re-create it and check it with `gzip -t`"
            ) from None


def _lines(file: str, local: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of the file at `local` (`file` names it in errors),
    decompressed on the fly for .gz, the UTF-8 byte-order mark dropped."""
    with _opened(file, local) as stream:
        for number, line in enumerate(stream, start=1):
            if number == 1 and line.startswith(UTF8_BOM):  # from some editors and Windows tools
                line = line[len(UTF8_BOM) :]
            elif number == 1:
                _refuse_other_encoding(file, line)
            yield number, line[:-1] if line.endswith(b"\n") else line


def _refuse_other_encoding(file: str, first_line: bytes) -> None:
    """InputError for a file that starts with the byte-order mark of UTF-16 or UTF-32 (what Windows PowerShell 5
    writes with `>`): else each of its lines was an 'invalid UTF-8' row, and the file 'not JSON Lines'."""
    for encoding, marks in OTHER_BOMS:
        if first_line.startswith(marks):
            raise InputError(
                f"{file} is {encoding}-encoded (it starts with a {encoding} byte-order mark), and JSON Lines is "
                f"read as UTF-8: convert it, e.g. `iconv -f {encoding} -t UTF-8 in.jsonl > out.jsonl` (in "
                "PowerShell, write files with `Out-File -Encoding utf8`)"
            )


def _text_blocks(file: str, local: str) -> Iterator[str]:
    """The text of the file at `local`, SCAN_BLOCK bytes at a time, decoded as UTF-8 (UnicodeDecodeError, a
    ValueError, where it is not), decompressed on the fly for .gz, the UTF-8 byte-order mark dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    started = False  # a first character was seen: the byte-order mark, where there is one, is behind
    with _opened(file, local) as stream:
        while block := stream.read(SCAN_BLOCK):
            text = decoder.decode(block)
            if not started and text:
                started, text = True, text.removeprefix("\ufeff")
            yield text
        yield decoder.decode(b"", final=True)


def _refuse_json_document(file: str, local: str) -> None:
    """InputError when a file whose first line is not an object is one JSON document (an array, an object
    over several lines): its lines are not rows. Only checked then, so a JSON Lines file is never re-parsed;
    the check (pipeline/data/json_document.py) stops within the first blocks of a JSON Lines file, and reads
    a document in blocks, without holding it."""
    try:
        with contextlib.closing(_text_blocks(file, local)) as blocks:  # the check may stop early: close now
            kind = document_kind(blocks)
    except InputError:  # the file cannot be read (e.g. a corrupt gzip): that, not 'not one document'
        raise
    except ValueError:  # not one document; UnicodeDecodeError is a ValueError
        return
    hint = JSONL_HINT_OBJECT if kind == "dict" else JSONL_HINT
    raise InputError(f"{file} is not JSON Lines: it is one JSON {kind}. {hint}")


class _DuplicateKeys(ValueError):
    """A JSON object of the line has a key more than once (json.loads would keep the last value silently)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """The object of `pairs`; _DuplicateKeys naming the keys that occur more than once. Costs ~2% of a read
    (the C scanner builds the pairs list instead of the dict, and one call per object)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        raise _DuplicateKeys(list(dict.fromkeys(k for k, _ in pairs if k in seen or seen.add(k))))
    return obj


_decode_json = json.JSONDecoder(object_pairs_hook=_unique_keys).decode


class _ObjectError(str):
    """The error of a line that is a JSON object, unusable as a row: the file is JSON Lines all the same."""


def _jsonl_line(line: bytes, where: str) -> tuple:
    if len(line) > LONG_LINE and line.lstrip(b" \t\r")[:1] == b"[":
        # Not an object whatever it holds, and json.loads of a file-long array (json.dump's one line) took ~7x
        # its size; the file is then checked for being one JSON document (_refuse_json_document).
        size = f"{len(line) / 2**20:.0f} MiB"
        raw = line[:RAW_KEPT].decode("utf-8", errors="replace")
        return None, f"{where}: a JSONL line must be an object; this one ({size}) starts with '['", raw
    raw = line.decode("utf-8", errors="replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"{where}: invalid UTF-8 at byte {e.start}", raw
    try:
        obj = _decode_json(text)
    except json.JSONDecodeError as e:
        return None, f"{where}: malformed JSON ({e.msg} at column {e.colno})", raw
    except _DuplicateKeys as e:
        keys = ", ".join(valid_text(repr(k)) for k in e.keys)
        return (
            None,
            _ObjectError(
                f"{where}: duplicate key(s) {keys} in one JSON object, so which value is meant is unclear (a "
                "JSON reader keeps only the last one); keep one value per key in the input"
            ),
            raw,
        )
    except RecursionError:
        limit = sys.getrecursionlimit()
        return (
            None,
            f"{where}: JSON nested too deeply to read (about {limit} levels at most); flatten it",
            raw,
        )
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return None, f"{where}: unreadable JSON value ({e})", raw
    if not isinstance(obj, dict):
        return None, f"{where}: a JSONL line must be an object, got {type(obj).__name__}", raw
    return obj, None, raw
