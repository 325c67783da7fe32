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


@pytest.mark.s3
def test_an_s3_input_read_through_the_environments_endpoint_names_it(s3_bucket, monkeypatch):
    """boto3 takes the endpoint from AWS_ENDPOINT_URL(_S3) when output.endpoint_url is unset: the error said the
    input was read from AWS S3. It names the variable and its URL, without a user:password@."""
    host = s3_bucket.endpoint.removeprefix("http://")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://user:CANARY@{host}")  # botocore leaves userinfo unused
    path = f"{s3_bucket.uri}-absent/in/prompts.jsonl"
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=path))
    message = str(error.value)
    assert "NoSuchBucket" in message and "CANARY" not in message
    assert (
        f"(the input is read through the endpoint in AWS_ENDPOINT_URL=http://***@{host}, as no "
        "output.endpoint_url is set)" in message
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_bucket.endpoint)  # the S3 one first, as boto3 takes it
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path=path))
    assert f"in AWS_ENDPOINT_URL_S3={s3_bucket.endpoint}, as no" in str(error.value)


def test_an_environment_endpoint_whose_password_holds_a_slash_is_not_echoed(monkeypatch):
    """AWS_ENDPOINT_URL=http://KEY:SE/CRET@host: botocore refuses it ("Custom endpoint ... was not a valid
    URI") and echoes it whole; a user:password@ was dropped only when it held no '/', so the secret was in the
    error, twice."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://KEY:SE/CANARY@127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    with pytest.raises(InputError) as error:
        read_input(DataConfig(path="s3://bkt/in/p.jsonl"), region="us-east-1")
    message = str(error.value)
    assert "CANARY" not in message and "KEY" not in message
    assert "in AWS_ENDPOINT_URL=http://***@127.0.0.1:1, as no output.endpoint_url is set" in message
