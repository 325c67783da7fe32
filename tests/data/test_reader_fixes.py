"""Input readers on inputs a review found to crash or mislead: every bad row becomes that row's error record
naming its column, a file that is unusable as a whole fails at start-up naming it, and what is written is
valid UTF-8 and strict JSON. Real files are written and read back; S3 input runs against a real SeaweedFS."""

from __future__ import annotations

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
