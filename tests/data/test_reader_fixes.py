"""Input readers on inputs a review found to crash or mislead: every bad row becomes that row's error record
naming its column, a file that is unusable as a whole fails at start-up naming it, and what is written is
valid UTF-8 and strict JSON. Real files are written and read back; S3 input runs against a real SeaweedFS."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def _write_lines(path, lines: list[str | bytes]) -> str:
    """Raw lines, written as given (a str line is UTF-8 encoded; JSON escapes such as \\ud800 stay text)."""
    path.write_bytes(b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines))
    return str(path)


def _rows(path: str, **config) -> list[dict]:
    records = read_input(DataConfig(path=path, **config))
    # What the job does with the records next: they must serialise (strict UTF-8) and read back.
    sink = pa.BufferOutputStream()
    pq.write_table(records.table, sink)
    return pq.read_table(pa.BufferReader(sink.getvalue())).to_pylist()


# ---------------------------------------------------------------------------------------- S3 prefixes
@pytest.mark.s3
def test_s3_prefix_reads_only_its_folder_not_sibling_prefixes(s3_bucket):
    s3_bucket.put("in/prompts/a.jsonl", b'{"prompt": "Add: 1+2"}\n')
    s3_bucket.put("in/prompts/sub/b.jsonl", b'{"prompt": "Add: 3+4"}\n')
    s3_bucket.put("in/prompts-old/c.jsonl", b'{"prompt": "old"}\n')
    s3_bucket.put("in/prompts_backup.jsonl", b'{"prompt": "backup"}\n')
    for path in (f"{s3_bucket.uri}/in/prompts", f"{s3_bucket.uri}/in/prompts/"):
        records = read_input(DataConfig(path=path), endpoint_url=s3_bucket.endpoint)
        assert records.files == [
            f"{s3_bucket.uri}/in/prompts/a.jsonl",
            f"{s3_bucket.uri}/in/prompts/sub/b.jsonl",
        ]
        assert [r["prompt"] for r in records.table.to_pylist()] == ["Add: 1+2", "Add: 3+4"]
    exact = read_input(
        DataConfig(path=f"{s3_bucket.uri}/in/prompts_backup.jsonl"), endpoint_url=s3_bucket.endpoint
    )
    assert [r["prompt"] for r in exact.table.to_pylist()] == ["backup"]


@pytest.mark.s3
def test_s3_jsonl_gz_and_parquet_read_as_the_same_local_files(s3_bucket, tmp_path):
    """S3 objects are streamed through a temporary file: the records match those of the same local files."""
    lines = [json.dumps({"prompt": f"Add: {i}+{i}", "k": i}) for i in range(300)] + ["{not json"]
    gz = gzip.compress(("\n".join(lines) + "\n").encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt": [f"Sort: {i} 3 1" for i in range(50)], "k": list(range(50))}), sink)
    for name, payload in (("in.jsonl.gz", gz), ("in.parquet", sink.getvalue().to_pybytes())):
        s3_bucket.put(f"in/{name}", payload)
        (tmp_path / name).write_bytes(payload)
        remote = read_input(DataConfig(path=f"{s3_bucket.uri}/in/{name}"), endpoint_url=s3_bucket.endpoint)
        local = read_input(DataConfig(path=str(tmp_path / name)))
        assert remote.table.to_pylist() == local.table.to_pylist(), name
        assert remote.fingerprint == local.fingerprint and remote.num_rows == (301 if "jsonl" in name else 50)
    assert read_input(DataConfig(path=str(tmp_path / "in.jsonl.gz"))).num_errors == 1


@pytest.mark.s3
def test_s3_prefix_with_only_sibling_objects_fails_naming_them(s3_bucket):
    s3_bucket.put("in/prompts-old/c.jsonl", b'{"prompt": "old"}\n')
    with pytest.raises(InputError, match="no .jsonl or .parquet objects under") as error:
        read_input(DataConfig(path=f"{s3_bucket.uri}/in/prompts"), endpoint_url=s3_bucket.endpoint)
    assert "in/prompts-old" in str(error.value)


# ---------------------------------------------------------------------------------------- hf kwargs
def test_failing_load_dataset_names_the_arguments_but_not_their_values(tmp_path):
    secret = "hf_SECRETtoken1234"
    config = DataConfig(
        path=f"hf:{tmp_path / 'nothing-here'}", format="hf", hf_kwargs={"token": secret, "revision": "main"}
    )
    with pytest.raises(InputError) as error:
        read_input(config)
    message = str(error.value)
    assert "token" in message and "revision" in message and "nothing-here" in message
    assert secret not in message and "'main'" not in message


# ---------------------------------------------------------------------------------------- deep nesting
def test_deeply_nested_json_line_is_that_rows_error(tmp_path):
    deep = '{"prompt": "Add: 1+2", "m": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = _write_lines(tmp_path / "deep.jsonl", [deep, '{"prompt": "Add: 3+4"}'])
    rows = _rows(path)
    assert rows[0]["error"].startswith("deep.jsonl:1: JSON nested too deeply")
    assert rows[1]["error"] is None and rows[1]["prompt"] == "Add: 3+4"


# ---------------------------------------------------------------------------------------- gzip
ROW = b'{"prompt": "Add: 1+2"}\n'


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("in.jsonl.gz", lambda: gzip.compress(ROW * 50)[:-30], "is a truncated gzip file"),
        ("in.jsonl.gz", lambda: ROW, "is not gzip-compressed .* rename it without .gz"),
        ("in.jsonl.gz", lambda: gzip.compress(ROW)[:-8] + b"\0" * 8, "is a corrupt gzip file"),
        # a compressed file named .jsonl failed as 'invalid UTF-8 at byte 1' rows, with no hint of compression
        ("in.jsonl", lambda: gzip.compress(ROW), r"looks gzip-compressed .*: name it \.jsonl\.gz"),
        ("in.jsonl", lambda: bz2.compress(ROW), "looks bzip2-compressed .*: decompress it"),
        ("in.jsonl", lambda: lzma.compress(ROW), "looks xz-compressed .*: decompress it"),
    ],
    ids=["truncated", "not-gzip", "bad-crc", "gzip-named-jsonl", "bzip2-named-jsonl", "xz-named-jsonl"],
)
def test_unusable_or_misnamed_compressed_input_fails_at_startup_naming_the_file(
    tmp_path, name, make, message
):
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(InputError, match=message) as error:
        read_input(DataConfig(path=str(path)))
    assert str(path) in str(error.value)


# ---------------------------------------------------------------------------------------- not JSON Lines
@pytest.mark.parametrize(
    "text",
    [
        '[{"prompt": "Add: 1+2"}, {"prompt": "Add: 3+4"}]',
        '[\n  {"prompt": "Add: 1+2"},\n  {"prompt": "Add: 3+4"}\n]',
        '[\n  {\n    "prompt": "Add: 1+2"\n  }\n]',
        '{\n  "prompt": "Add: 1+2"\n}',
    ],
    ids=["array", "pretty-array", "pretty-array-of-multiline-objects", "pretty-object"],
)
def test_a_json_array_is_not_json_lines(tmp_path, text):
    path = tmp_path / "in.json"
    path.write_text(text + "\n")
    with pytest.raises(InputError, match="is not JSON Lines") as error:
        read_input(DataConfig(path=str(path)))
    assert str(path) in str(error.value) and "jq -c" in str(error.value)
    if text.startswith("["):
        assert "`jq -c '.[]' in.json > in.jsonl`" in str(error.value)


@pytest.mark.parametrize(
    "text",
    ['{\n  "prompt": "Add: 1+2"\n}', '{"data": [\n  {"prompt": "Add: 1+2"},\n  {"prompt": "Add: 3+4"}\n]}'],
    ids=["one-row", "rows-under-a-key"],
)
def test_a_json_object_gets_advice_for_an_object(tmp_path, text):
    """A file holding one JSON object was told to run `jq -c '.[]'`, which converts arrays only (on an object it
    writes its values, not rows)."""
    path = tmp_path / "in.json"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(path)))
    message = str(error.value)
    assert f"{path} is not JSON Lines: it is one JSON dict." in message
    assert "jq -c '.[]'" not in message
    assert "if the object is one row, write it on one line: `jq -c . in.json > in.jsonl`" in message.lower()
    assert "`jq -c '.data[]' in.json > in.jsonl`" in message


# (text, kind): a file that is one JSON container of that kind, refused whole; kind None: not one container, so its
# lines are rows (each bad one that row's error), or, when none is an object, the file is refused as such.
DOCUMENT_CASES = [
    ("[1, 2]", "list"),
    ('[\n  {"prompt": "a ] } [ {"},\n  {"prompt": "b \\" ]"}\n]', "list"),  # brackets and quotes in strings
    ('{"a": [1, {"b": "]"}],\n "c": {}, "d": -1.5e+3}', "dict"),
    ("\n\n  [\n[[]], {}, true, null\n]\n\n   \n", "list"),  # blank lines around it
    ('["a\\\\", "b", "' + "x" * 40 + '\\"' + "y" * 20 + '"]', "list"),  # escapes; a string longer than blocks
    ("[" * 500 + "]" * 500, "list"),
    ('[\n{"prompt": "a", "s": NaN},\n{"prompt": "b", "s": -Infinity}\n]', "list"),  # as Python's json writes
    (json.dumps(['{\\"k\\": 1}' * 2000, 1]), "list"),  # embedded JSON: escaped quotes in a long string
    (b'\xef\xbb\xbf[\n{"prompt": "a"}\n]', "list"),  # a byte-order mark, also split across blocks
    ('"just a string"', None),  # a scalar: its one line is not an object
    ("123", None),
    ("[1]\n[2]", None),
    ("[1] [2]", None),  # two values on one line
    ('[1]\n{"prompt": "Add: 1+2"}', None),
    ('[\n{"prompt": "Add: 1+2"}', None),  # never closed
    ('{"a": 1}}\n{"prompt": "Add: 1+2"}', None),
    ('[}\n{"prompt": "Add: 1+2"}', None),  # mismatched
    ('["unterminated]\n{"prompt": "x]"}', None),
    ("[foo]", None),  # not JSON
    ("[1\n2]", None),  # lines without a comma between their values
    ("[12,\n]", None),  # a trailing comma
    ('{"a" 1}', None),
    ("[" * 2000 + "]", None),
    ("[" * 2000 + "]" * 2000, None),  # deeper than json reads
    (b"[\xff]", None),  # not UTF-8
]


@pytest.mark.parametrize("block", [1, 7, None], ids=["block-1", "block-7", "block-default"])
@pytest.mark.parametrize(
    ("text", "kind"), DOCUMENT_CASES, ids=[f"case{i}" for i in range(len(DOCUMENT_CASES))]
)
def test_only_a_file_that_is_one_json_container_is_refused_as_one(tmp_path, monkeypatch, text, kind, block):
    """The check reads the file SCAN_BLOCK bytes at a time (pipeline/data/json_document.py): a value that ends,
    a string or number that goes on, or a second value that starts at any block boundary is found."""
    from pipeline.data import jsonl

    if block is not None:
        monkeypatch.setattr(jsonl, "SCAN_BLOCK", block)
    path = tmp_path / "in.jsonl"
    path.write_bytes((text.encode() if isinstance(text, str) else text) + b"\n")
    if kind is not None:
        assert (
            kind
            == type(
                json.loads(text.removeprefix(b"\xef\xbb\xbf") if isinstance(text, bytes) else text)
            ).__name__
        )
        with pytest.raises(InputError, match=f"is not JSON Lines: it is one JSON {kind}. "):
            read_input(DataConfig(path=str(path)))
        return
    try:
        records = read_input(DataConfig(path=str(path)))
    except InputError as e:  # no line is an object: refused, but not as one document
        assert "none of its" in str(e) and "is one JSON" not in str(e)
    else:
        assert records.num_errors >= 1 and records.num_rows > records.num_errors


def test_a_non_jsonl_file_among_good_ones_fails_naming_it(tmp_path):
    _write_lines(tmp_path / "a.jsonl", ["{broken", "[1]", '{"prompt": "Add: 1+2"}', "{again"])
    _write_lines(tmp_path / "b.json", ['["Add: 3+4"]'])
    with pytest.raises(InputError, match=r"b\.json is not JSON Lines"):
        read_input(DataConfig(path=str(tmp_path)))
    (tmp_path / "b.json").unlink()
    # Bad lines before a file's first object are still that file's row errors, in input order.
    rows = _rows(str(tmp_path))
    assert [r["source_index"] for r in rows] == [0, 1, 2, 3]
    assert [r["error"] is None for r in rows] == [False, False, True, False]


# ---------------------------------------------------------------------------------------- BOM
def test_utf8_bom_at_the_start_of_a_jsonl_file_is_ignored(tmp_path):
    path = _write_lines(
        tmp_path / "bom.jsonl", [b'\xef\xbb\xbf{"prompt": "Add: 1+2"}', b'{"prompt": "Add: 3+4"}']
    )
    rows = _rows(path)
    assert [(r["prompt"], r["error"]) for r in rows] == [("Add: 1+2", None), ("Add: 3+4", None)]
    plain = _rows(
        _write_lines(tmp_path / "plain.jsonl", ['{"prompt": "Add: 1+2"}', '{"prompt": "Add: 3+4"}'])
    )
    assert [r["id"] for r in rows] == [r["id"] for r in plain], "the BOM is not part of the content"


def test_utf8_bom_at_the_start_of_a_jsonl_gz_file_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl.gz"
    path.write_bytes(gzip.compress(b'\xef\xbb\xbf{"prompt": "Add: 1+2"}\n'))
    assert [(r["prompt"], r["error"]) for r in _rows(str(path))] == [("Add: 1+2", None)]


@pytest.mark.parametrize(
    ("encoding", "named", "suffix"),
    [
        ("utf-16", "UTF-16", "jsonl"),  # little-endian with its BOM, as Windows PowerShell 5's `>` writes
        ("utf-16-be", "UTF-16", "jsonl"),
        ("utf-32", "UTF-32", "jsonl"),
        ("utf-16", "UTF-16", "jsonl.gz"),
    ],
)
def test_a_utf16_or_utf32_jsonl_file_fails_at_startup_naming_its_encoding(tmp_path, encoding, named, suffix):
    """It failed as "not JSON Lines: none of its 2 non-blank line(s) is a JSON object (first: ...: invalid
    UTF-8 at byte 0)", with advice on converting a JSON array: nothing said the file was UTF-16."""
    text = '{"prompt": "Add: 1+2"}\n{"prompt": "Add: 3+4"}\n'
    data = ("\ufeff" + text).encode(encoding) if encoding.endswith("-be") else text.encode(encoding)
    path = tmp_path / f"in.{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=str(tmp_path)))
    assert str(error.value) == (
        f"{path} is {named}-encoded (it starts with a {named} byte-order mark), and JSON Lines is read as "
        f"UTF-8: convert it, e.g. `iconv -f {named} -t UTF-8 in.jsonl > out.jsonl` (in PowerShell, write "
        "files with `Out-File -Encoding utf8`)"
    )


# ---------------------------------------------------------------------------------------- parquet
def _string_array_with_invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string column holding the given bytes unvalidated, as a non-validating writer produces."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    data = pa.py_buffer(b"".join(values))
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), data])


def test_invalid_utf8_in_a_parquet_string_column_is_that_rows_error(tmp_path):
    prompts = _string_array_with_invalid_utf8([b"Add: 1+2", b"Add: \xff\xfe", b"Add: 5+6"])
    notes = _string_array_with_invalid_utf8([b"fine", b"fine", b"caf\xe9"])
    pq.write_table(pa.table({"prompt": prompts, "note": notes}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["Add: 7+8"], "note": ["ok"]}), tmp_path / "0.parquet")
    rows = _rows(str(tmp_path))  # 0.parquet, then a.parquet
    assert [r["error"] is None for r in rows] == [True, True, False, False]
    assert rows[2]["error"].startswith("a.parquet row 1: column 'prompt' is not valid UTF-8")
    assert rows[3]["error"].startswith("a.parquet row 2: column 'note' is not valid UTF-8")
    assert "Add: \ufffd\ufffd" in rows[2]["raw"]
    assert [r["prompt"] for r in rows[:2]] == ["Add: 7+8", "Add: 1+2"]
    assert [r["source_index"] for r in rows] == [0, 1, 2, 3]


def test_a_bad_parquet_value_past_the_first_batch_names_its_row_in_the_file(tmp_path):
    """The reader decodes 4,096 rows at a time: a bad value in a later batch names its row in the file, not in
    the batch."""
    values = [f"Add: {i}+1".encode() for i in range(5000)]
    values[4100] = b"Add: \xff\xfe"
    pq.write_table(
        pa.table({"prompt": _string_array_with_invalid_utf8(values)}),
        tmp_path / "a.parquet",
        row_group_size=5000,
    )
    rows = _rows(str(tmp_path / "a.parquet"))
    bad = [r for r in rows if r["error"] is not None]
    assert [r["source_index"] for r in bad] == [4100]
    assert bad[0]["error"].startswith("a.parquet row 4100: column 'prompt' is not valid UTF-8"), bad[0][
        "error"
    ]


def test_undecodable_parquet_fails_at_startup_naming_the_file(tmp_path):
    pq.write_table(pa.table({"prompt": ["Add: 1+2"] * 1000}), tmp_path / "in.parquet", compression="snappy")
    payload = bytearray((tmp_path / "in.parquet").read_bytes())
    payload[200:400] = b"\xff" * 200  # inside the first data page
    (tmp_path / "in.parquet").write_bytes(bytes(payload))
    with pytest.raises(InputError, match="is not a readable Parquet file .*; re-export it") as error:
        read_input(DataConfig(path=str(tmp_path / "in.parquet")))
    assert str(tmp_path / "in.parquet") in str(error.value)


# ---------------------------------------------------------------------------------------- lone surrogates
def test_lone_surrogate_in_an_extra_column_is_that_rows_error(tmp_path):
    path = _write_lines(
        tmp_path / "in.jsonl",
        ['{"prompt": "Add: 1+2", "note": "\\ud800"}', '{"prompt": "Add: 3+4", "note": "ok"}'],
    )
    rows = _rows(path)
    assert "column 'note'" in rows[0]["error"] and "lone surrogate" in rows[0]["error"]
    assert rows[0]["raw"] == '{"prompt": "Add: 1+2", "note": "\\ud800"}', "the raw line is kept as written"
    assert rows[1]["error"] is None and json.loads(rows[1]["metadata"]) == {"note": "ok"}


def test_lone_surrogate_in_a_column_name_is_that_rows_error(tmp_path):
    path = _write_lines(
        tmp_path / "in.jsonl", ['{"prompt": "Add: 1+2", "n\\udc00": 1}', '{"prompt": "Add: 3+4"}']
    )
    rows = _rows(path)
    assert "column name" in rows[0]["error"] and "lone surrogate" in rows[0]["error"]
    assert rows[1]["error"] is None


def test_lone_surrogate_in_the_id_column_is_that_rows_error(tmp_path):
    path = _write_lines(
        tmp_path / "in.jsonl", ['{"prompt": "Add: 1+2", "rid": "\\udc00"}', '{"prompt": "x", "rid": "b"}']
    )
    rows = _rows(path, id_column="rid")
    assert "id in column 'rid'" in rows[0]["error"] and "lone surrogate" in rows[0]["error"]
    assert rows[0]["id"].isascii(), "the error row gets a derived id"
    assert rows[1]["id"] == "b" and rows[1]["error"] is None


def test_lone_surrogate_in_a_message_role_is_that_rows_error(tmp_path):
    path = _write_lines(
        tmp_path / "chat.jsonl",
        [
            '{"messages": [{"role": "us\\ud800er", "content": "Add: 1+2"}]}',
            '{"messages": [{"role": "user", "content": "Add: 3+4"}]}',
        ],
    )
    rows = _rows(path, messages_column="messages")
    assert "messages[0].role" in rows[0]["error"] and "lone surrogate" in rows[0]["error"]
    assert rows[1]["error"] is None and json.loads(rows[1]["prompt"])[0]["role"] == "user"


# ---------------------------------------------------------------------------------------- NaN / Infinity
def _refuse_constant(name: str):
    pytest.fail(f"{name} in metadata: not valid JSON")


def test_non_finite_floats_in_metadata_are_written_as_null(tmp_path):
    pq.write_table(
        pa.table(
            {
                "prompt": ["a", "b", "c"],
                "f": [math.nan, math.inf, 1.5],
                "lst": [[-math.inf, 2.0], [], [3.0]],
                "s": [{"x": math.nan}, {"x": 1.0}, {"x": None}],
            }
        ),
        tmp_path / "in.parquet",
    )
    rows = _rows(str(tmp_path / "in.parquet"))
    metadata = [r["metadata"] for r in rows]
    for text in metadata:  # strict JSON: parse_constant is only called for NaN / Infinity
        json.loads(text, parse_constant=_refuse_constant)
    assert [json.loads(m) for m in metadata] == [
        {"f": None, "lst": [None, 2.0], "s": {"x": None}},
        {"f": None, "lst": [], "s": {"x": 1.0}},
        {"f": 1.5, "lst": [3.0], "s": {"x": None}},
    ]


def test_non_finite_floats_in_jsonl_metadata_are_written_as_null(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", ['{"prompt": "a", "score": NaN, "hi": Infinity, "n": 2}'])
    (row,) = _rows(path)
    assert row["error"] is None
    assert json.loads(row["metadata"], parse_constant=_refuse_constant) == {
        "score": None,
        "hi": None,
        "n": 2,
    }


# ---------------------------------------------------------------------------------------- binary columns
def test_binary_values_are_carried_as_their_text_and_one_that_is_no_text_is_that_rows_error(tmp_path):
    """A Parquet binary column (bytes in Python) was written with str(): metadata {"tag": "b'ok'"}, and a chat's
    binary content reached the model as the text "b'Add: 1+2'"."""
    message = pa.struct([("role", pa.string()), ("content", pa.binary())])
    pq.write_table(
        pa.table(
            {
                "messages": pa.array([[{"role": "user", "content": b"Add: 1+2"}]] * 2, pa.list_(message)),
                "tag": pa.array([b"ok", b"\x89PNG"]),
                "nested": [{"b": b"x"}, {"b": b"y"}],
            }
        ),
        tmp_path / "in.parquet",
    )
    good, bad = _rows(str(tmp_path / "in.parquet"), messages_column="messages")
    assert json.loads(good["prompt"]) == [{"role": "user", "content": "Add: 1+2"}]
    assert good["error"] is None and json.loads(good["metadata"]) == {"tag": "ok", "nested": {"b": "x"}}
    assert bad["error"] == (
        "column 'tag' holds binary data that is not UTF-8 text (byte 0 of the value), which the JSON of the "
        "metadata column cannot hold; leave the column out (data.metadata_columns lists the columns to carry) or "
        "encode its values as text (e.g. base64) in the input"
    )
    assert json.loads(bad["raw"])["tag"] == "\ufffdPNG", "the raw row shows the bytes, bad ones replaced"


# ---------------------------------------------------------------------------------------- duplicate ids
def test_duplicate_of_an_id_first_seen_on_an_error_row_is_flagged(tmp_path):
    path = _write_lines(
        tmp_path / "ids.jsonl",
        [
            '{"rid": "a", "prompt": ""}',  # an error row (empty prompt) with id a
            '{"rid": "a", "prompt": "Add: 1+2"}',  # id a again: a duplicate, although a is not in data/
            '{"rid": "b", "prompt": "Add: 2+2"}',
            '{"rid": "b", "prompt": ""}',  # an error row of its own: its first error is kept
        ],
    )
    rows = _rows(path, id_column="rid")
    assert rows[0]["error"] == "prompt (column 'prompt') is empty"
    assert rows[1]["error"] == "duplicate id 'a' (first seen at input row 0)"
    assert rows[2]["error"] is None
    assert rows[3]["error"] == "prompt (column 'prompt') is empty"


def test_parquet_files_are_read_one_at_a_time(tmp_path):
    """Each file is checked and read on its own: one without the prompt column fails naming that file, and
    with data.limit reading stops once enough rows are read (a later unreadable file is never opened)."""
    pq.write_table(pa.table({"prompt": [f"Add: {i}+1" for i in range(5)]}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"text": ["Add: 9+9"]}), tmp_path / "1.parquet")
    with pytest.raises(InputError, match=r"no column 'prompt' in .*1\.parquet; its columns are: text"):
        read_input(DataConfig(path=str(tmp_path)))
    (tmp_path / "1.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(InputError, match=r"1\.parquet is not a readable Parquet file"):
        read_input(DataConfig(path=str(tmp_path)))
    assert [r["prompt"] for r in _rows(str(tmp_path), limit=3)] == ["Add: 0+1", "Add: 1+1", "Add: 2+1"]


@pytest.mark.parametrize("fmt", ["auto", "jsonl", "parquet"])
def test_a_directory_without_data_files_names_what_it_skipped(tmp_path, fmt):
    """A folder of prompts.txt / prompts.csv said 'holds no rows' with data.format=jsonl (or 'cannot tell the
    format from no data files'), as if the files were empty: only the suffix picks the files of a folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "prompts.txt").write_text(json.dumps({"prompt": "Add: 1+2"}) + "\n")
    (folder / "more.csv").write_text("prompt\nAdd: 1+2\n")
    with pytest.raises(InputError) as info:
        read_input(DataConfig(path=str(folder), format=fmt))
    message = str(info.value)
    assert (
        f"data.path={str(folder)!r}: no .jsonl, .json, .ndjson, .jsonl.gz, .json.gz, .ndjson.gz, .parquet or .pq file"
        in message
    )
    assert "2 other file(s) skipped (more.csv, prompts.txt)" in message


def test_an_empty_directory_says_so(tmp_path):
    with pytest.raises(InputError, match=r"no \.jsonl, .* file in this directory \(it is empty\)"):
        read_input(DataConfig(path=str(tmp_path), format="jsonl"))


def test_a_failed_load_dataset_names_the_missing_file_and_hides_secrets_at_any_depth(tmp_path):
    """The file a data_files argument names is no secret: it was hidden with the token; a value nested in
    storage_options or headers was not hidden at all."""
    from pipeline.data.hf_datasets import redact

    missing = str(tmp_path / "nope" / "prompts.jsonl")
    kwargs = {
        "path": "json",
        "data_files": missing,
        "token": "hf_secret_token_1",
        "storage_options": {"key": "AKIAEXAMPLE", "secret": "nested-secret-2"},
        "headers": [{"authorization": "Bearer abc-3"}],
    }
    data = DataConfig(path="hf:json", format="hf", hf_kwargs=kwargs)
    with pytest.raises(InputError) as info:
        read_input(data)
    assert missing in str(info.value) and "datasets.load_dataset failed" in str(info.value)
    message = f"cannot open {missing} with hf_secret_token_1, AKIAEXAMPLE / nested-secret-2 and Bearer abc-3"
    assert redact(message, kwargs) == f"cannot open {missing} with ***, *** / *** and ***"


@pytest.mark.parametrize(
    ("indent", "rows", "times_size"),
    [
        # The check that a file is one JSON document read the whole file into memory (and a JSON Lines file
        # with a stray first line as well): ~2.5x the file's size, enough to kill the driver on a multi-GB input.
        # Now it reads 64 KiB blocks: 0.04x of this 12 MB file.
        (2, 200_000, 0.1),
        # json.dump's default output is one line: that line was parsed whole as a JSON Lines row before the file
        # was refused (82 MB file: 673 MB peak RSS, then 373 MB, 110 MB of it the process before reading).
        # Parsed: 9.3x the size under tracemalloc; the line and a walk of its values: 4x; the line read as the
        # first row (twice while its newline is cut off) and the check's blocks: 2.0x.
        (None, 300_000, 2.5),
    ],
    ids=["pretty-printed", "one-line"],
)
def test_a_large_json_document_is_refused_without_holding_it(tmp_path, indent, rows, times_size):
    import tracemalloc

    path = tmp_path / "big.json"
    with path.open("w") as f:
        json.dump([{"prompt": f"Add: {i}+{i}", "k": i} for i in range(rows)], f, indent=indent)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="is not JSON Lines: it is one JSON list"):
            read_input(DataConfig(path=str(path), format="jsonl"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 10_000_000 and peak < times_size * size, (size, peak)


def test_a_long_array_line_among_json_lines_is_that_rows_error(tmp_path):
    long_line = json.dumps(list(range(300_000)))  # over a MiB: refused without parsing
    path = _write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": "Add: 1+2"}), long_line])
    records = read_input(DataConfig(path=path))
    assert records.num_rows == 2 and records.num_errors == 1
    (reason,) = [r for r in records.table.column("error").to_pylist() if r]
    assert reason.startswith("in.jsonl:2: a JSONL line must be an object; this one (2 MiB) starts with '['")


def test_lines_of_a_json_lines_file_are_not_joined_into_one_document(tmp_path):
    """The lines were joined without their newlines, so the lines '[1' and '2]' read as the document [12]."""
    path = _write_lines(tmp_path / "in.jsonl", ["[1", "2]"])
    with pytest.raises(InputError, match=r"none of its 2 non-blank line\(s\) is a JSON object"):
        read_input(DataConfig(path=path))


def test_an_empty_jsonl_gz_holds_no_rows_like_an_empty_jsonl(tmp_path):
    """It said 'is not gzip-compressed'."""
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    with pytest.raises(InputError, match="holds no rows"):
        read_input(DataConfig(path=str(tmp_path / "empty.jsonl.gz")))
    (tmp_path / "a.jsonl").write_text('{"prompt": "Add: 1+2"}\n')
    assert read_input(DataConfig(path=str(tmp_path))).num_rows == 1


def test_a_parquet_file_of_no_columns_says_so(tmp_path):
    """A Parquet file of an empty schema failed with "...; its columns are: . Set data.prompt_column.": it says
    that the file has no columns, for the prompt column and a template's alike."""
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({}), path)
    none = "it has no columns at all (its schema is empty: write the file with its columns)"
    with pytest.raises(InputError) as e:
        read_input(DataConfig(path=str(path)))
    assert str(e.value) == f"the input has no column 'prompt' in {path}; {none}. Set data.prompt_column."
    with pytest.raises(InputError, match=r"of data\.prompt_template in .*; it has no columns at all"):
        read_input(DataConfig(path=str(path), prompt_template="Q: {q}"))
    assert "its columns are: " not in str(e.value)
