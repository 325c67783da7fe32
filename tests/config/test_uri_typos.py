"""A path that looks like a URI but is not s3:// fails at start-up: as a local folder it would silently
create ./S3:/bucket/... or read nothing."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, to_job_config
from tests.config.test_config import _compose


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("output.uri=S3://bucket/runs", "output.uri", "S3://bucket/runs"),
        ("output.uri=s3:/bucket/runs", "output.uri", "s3:/bucket/runs"),
        ("data.path=gs://bucket/prompts.jsonl", "data.path", "gs://bucket/prompts.jsonl"),
        ("model.path=file:///models/dg", "model.path", "file:///models/dg"),
    ],
)
def test_uri_typos_fail_naming_the_key(override, key, value):
    with pytest.raises(ConfigError, match=rf"{key}='{value}' looks like a .* URI; only s3://bucket/prefix"):
        to_job_config(_compose(override))


@pytest.mark.parametrize(
    "override",
    [
        "output.uri=s3://bucket/runs",
        "data.path=hf:json",
        "model.path=builtin:tiny-diffusiongemma",
        "output.uri=./out:v1",
    ],
)
def test_s3_builtin_hf_and_local_paths_pass(override):
    to_job_config(_compose(override))


@pytest.mark.parametrize("key", ["output.uri", "data.path", "model.path"])
@pytest.mark.parametrize("value", ["s3://", "s3:///prefix", "s3:////"])
def test_s3_uris_without_a_bucket_fail_naming_the_key(key, value):
    # s3:///prefix used to pass validation and fail later in split_s3_uri with a ValueError traceback
    with pytest.raises(ConfigError, match=rf"{key}='{value}' needs a bucket: s3://bucket/prefix"):
        to_job_config(_compose(f"{key}={value}"))


@pytest.mark.parametrize("value", ["127.0.0.1:8333", "localhost:9000", "ftp://127.0.0.1:21", "http://"])
def test_an_endpoint_url_without_http_scheme_and_host_fails_naming_the_key(value):
    # 127.0.0.1:8333 (no scheme) passed validation and ended in botocore's ValueError traceback
    with pytest.raises(ConfigError, match=rf"output.endpoint_url='{value}' .*http://host:port"):
        to_job_config(_compose("output.uri=s3://bucket/runs", f"output.endpoint_url={value}"))


@pytest.mark.parametrize(
    "value", ["http://127.0.0.1:8333", "https://s3.example.com", "HTTPS://R2.example.com/"]
)
def test_http_endpoint_urls_pass(value):
    assert to_job_config(_compose(f"output.endpoint_url={value}")).output.endpoint_url == value


@pytest.mark.parametrize("key", ["output.uri", "data.path", "model.path"])
@pytest.mark.parametrize(
    "secret", ["SeCrEtVaLuE1", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
)  # '/' as in AWS keys
def test_s3_uris_with_credentials_fail_without_echoing_them(key, secret):
    # s3://KEY:SECRET@bucket went on to botocore's "Invalid bucket name" error, the secret in it two or three times
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose(f"{key}=s3://AKIAFAKE:{secret}@bucket/prefix"))
    assert f"{key} holds credentials (s3://user:password@bucket)" in str(info.value)
    assert secret.split("/")[0] not in str(info.value) and "AKIAFAKE" not in str(info.value)


def test_an_at_sign_in_an_s3_key_is_no_credential():
    to_job_config(_compose("data.path=s3://bucket/team:a@b/prompts.jsonl"))


@pytest.mark.parametrize("value", ["s3://my bucket/x", "s3://bucket:1/x", "s3://b%c3/x"])
def test_s3_uris_with_an_impossible_bucket_name_fail_naming_it(value):
    bucket = value[len("s3://") :].partition("/")[0]
    with pytest.raises(
        ConfigError, match=rf"data.path='{value}' names the bucket '{bucket}': a bucket name has"
    ):
        to_job_config(_compose(f"data.path={value}"))


@pytest.mark.parametrize(
    "override",
    [
        "output.endpoint_url=http://AKIAFAKE:SeCrEtVaLuE1@127.0.0.1:8333",
        "cluster.address=https://AKIAFAKE:SeCrEtVaLuE1@head:8265",  # with cluster=ray: a dashboard address
    ],
)
def test_urls_with_credentials_fail_without_echoing_them(override):
    """An endpoint or Ray address holding user:password@ fails at start-up, and the error (which is logged)
    holds neither the user nor the password."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("output.uri=s3://bucket/runs", "cluster=ray", override))
    assert override.split("=")[0] in str(info.value)
    assert "SeCrEtVaLuE1" not in str(info.value) and "AKIAFAKE" not in str(info.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://AKIAFAKE:wJalrXUtnFEMI/K7MDENG/CANARYsecret@127.0.0.1:8333",  # '/' as in AWS secret keys
        "http://127.0.0.1:8333/?X-Amz-Credential=AKIAFAKE&X-Amz-Signature=CANARYsecret",
        "http://127.0.0.1:8333/#X-Amz-Security-Token=CANARYsecret",
        "AKIAFAKE:CANARYsecret@127.0.0.1:8333",  # the scheme forgotten
        "s3://AKIAFAKE:CANARYsecret@127.0.0.1:8333",
        "127.0.0.1:8333/?X-Amz-Security-Token=CANARYsecret",
    ],
)
def test_endpoints_holding_credentials_fail_without_echoing_them(endpoint):
    """http://KEY:SEC/RET@host passed (the host part ended at the secret's first '/') and a presigned-style
    query passed too: both were then written in every S3 log line and error, the secret with them. An endpoint
    that is not http(s) was refused by echoing it whole, "output.endpoint_url='AKIAFAKE:CANARYsecret@...' must
    be an http:// or https:// URL", the password with it."""
    from pipeline import LLM

    with pytest.raises(ConfigError) as job_error:
        to_job_config(_compose("output.uri=s3://bucket/runs", f"output.endpoint_url='{endpoint}'"))
    with pytest.raises(ConfigError) as api_error:
        LLM("builtin:tiny-diffusiongemma", endpoint_url=endpoint)
    for shown, key in ((str(job_error.value), "output.endpoint_url"), (str(api_error.value), "endpoint_url")):
        assert shown.startswith(f"{key} holds ")
        assert "CANARYsecret" not in shown and "AKIAFAKE" not in shown and "wJalr" not in shown


SIGNED = "X-Amz-Credential=AKIAFAKE%2F20260101&X-Amz-Security-Token=CANARYtoken&X-Amz-Signature=CANARYsig"


@pytest.mark.parametrize("key", ["output.uri", "data.path", "model.path"])
@pytest.mark.parametrize(
    "value",
    [
        f"https://bucket.s3.amazonaws.com/prompts.jsonl?{SIGNED}",  # a presigned URL pasted as a path
        f"s3://bucket/prompts.jsonl?{SIGNED}",
        "https://AKIAFAKE:wJalr/CANARYsig@host/prompts.jsonl",
    ],
)
def test_locations_holding_a_signed_query_or_a_password_fail_without_echoing_them(key, value):
    """A presigned URL's signature and session token were echoed by the 'looks like a https URI' refusal, or
    (after s3://) in 'reading input ...' and every error naming the location."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose(f"{key}='{value}'"))
    shown = str(info.value)
    assert shown.startswith(key)
    assert "CANARY" not in shown and "AKIAFAKE" not in shown and "wJalr" not in shown


@pytest.mark.parametrize(
    "model", ["s3://AKIAFAKE:wJalr/CANARYsig@bucket/models/dg", f"s3://bucket/models/dg?{SIGNED}"]
)
def test_the_api_refuses_a_model_location_with_credentials_without_echoing_them(model):
    """LLM(model=s3://KEY:SECRET@bucket/...) went on to botocore's 'Invalid bucket name' error, the key and
    secret in the ModelError three times."""
    from pipeline import LLM

    with pytest.raises(ConfigError) as info:
        LLM(model)
    assert str(info.value).startswith("model holds ")
    assert "CANARY" not in str(info.value) and "AKIAFAKE" not in str(info.value)


@pytest.mark.parametrize(
    "address",
    [
        "ray://user:CANARYtoken@head:10001",
        "AKIAFAKE:wJalr/CANARYtoken@head:6379",
        "head:6379?token=CANARYtoken",
    ],
)
def test_a_ray_address_holding_credentials_fails_without_echoing_them(address):
    """cluster.address=ray://user:TOKEN@head:10001 was accepted, then logged ("connecting to the Ray cluster at
    ...", the dry run's "2 worker(s) on ...") and repeated in the connection error."""
    with pytest.raises(ConfigError) as info:
        to_job_config(_compose("cluster=ray", f"cluster.address='{address}'"))
    shown = str(info.value)
    assert shown.startswith("cluster.address holds credentials")
    assert "CANARY" not in shown and "AKIAFAKE" not in shown and "wJalr" not in shown
