"""An s3:// input that cannot be read says that output.endpoint_url is the endpoint setting and that the input
uses it too: with the endpoint left out on a MinIO / SeaweedFS input, the error after the retries named
neither (the output side's error already did)."""

from __future__ import annotations

import pytest

from pipeline.config.schema import DataConfig
from pipeline.data.readers import InputError, read_input


def test_an_s3_input_read_from_aws_says_to_set_output_endpoint_url(tmp_path, monkeypatch):
    """No endpoint: the request goes to AWS. Without credentials it fails at once (no network needed)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path="s3://canvasflow-test-bucket/in/prompts.jsonl"), region="us-east-1")
    message = str(error.value)
    assert message.startswith("data.path='s3://canvasflow-test-bucket/in/prompts.jsonl' cannot be listed")
    assert "the input is read from AWS S3, as no output.endpoint_url is set" in message
    assert "set output.endpoint_url=<its URL>, which the input uses too" in message


@pytest.mark.s3
def test_an_s3_input_read_through_an_endpoint_names_output_endpoint_url(s3_bucket):
    path = f"{s3_bucket.uri}-absent/in/prompts.jsonl"  # a bucket this endpoint does not have
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=path), endpoint_url=s3_bucket.endpoint)
    message = str(error.value)
    assert f"data.path={path!r} cannot be listed" in message and "NoSuchBucket" in message
    assert (
        f"(the input is read through output.endpoint_url={s3_bucket.endpoint}, as the output is)" in message
    )
