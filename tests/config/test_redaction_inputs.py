"""redact_text and without_userinfo on long adversarial texts (the shapes that once took quadratic time: see
benchmarks/bench_redaction.py, which measures them) still find the secret after them, and the keys and URLs
they found before."""

from __future__ import annotations

import pytest

from pipeline.config.redact import REDACTED, redact_text
from pipeline.config.validate import without_userinfo

LONG = {
    "long-word": "data.hf_kwargs.prompt=" + "x" * 100_000,  # a key was looked for at each of its letters
    "dashed-word": "a-" * 50_000,
    "unclosed-brackets": "n=[\n" * 12_500,  # each unclosed bracket was followed to the end of the text
    "key-value-pairs": "a=" * 50_000,
}


@pytest.mark.parametrize("text", LONG.values(), ids=LONG.keys())
def test_a_secret_after_a_long_adversarial_text_is_redacted(text):
    redacted = redact_text(f"{text}\n--token=hf_CANARY x")
    assert "CANARY" not in redacted and redacted.endswith(f"--token={REDACTED} x")
    assert redact_text(text) == text, "nothing secret in it: unchanged"


def test_a_large_cfg_job_output_is_redacted_where_its_secret_is():
    keys = "".join(f"  field_{i}: value {i}\n" for i in range(20_000))
    redacted = redact_text(f"postprocess:\n{keys}  token: hf_SECRET\n")
    assert redacted == f"postprocess:\n{keys}  token: {REDACTED}\n"


def test_redaction_finds_the_same_keys_as_before():
    assert redact_text("--token=abc123 x") == f"--token={REDACTED} x"
    assert redact_text("1token=abc123") == f"1token={REDACTED}"
    assert redact_text("a=b.token=SECRET") == f"a=b.token={REDACTED}"
    assert redact_text("x={api_key: SECRET, n: 1}") == f"x={{api_key: {REDACTED}, n: 1}}"
    assert redact_text("token=[a, [b]] n=1") == f"token={REDACTED} n=1"
    assert redact_text("- password: hunter22\nsay token: abc") == f"- password: {REDACTED}\nsay token: abc"


@pytest.mark.parametrize(
    "text",
    ["a-" * 50_000, "http://" * 15_000, "http://a:" * 11_000, "ftp://x:" + "y/" * 50_000],
    ids=["dashed-word", "urls", "urls-with-colon", "long-path"],
)
def test_without_userinfo_after_a_long_adversarial_text_drops_the_password(text):
    assert without_userinfo(f"{text} http://KEY:SE/CRET@host") == f"{text} http://***@host"


def test_without_userinfo_drops_the_same_user_and_password_as_before():
    assert without_userinfo("see http://KEY:SE/CRET@host/x") == "see http://***@host/x"
    assert without_userinfo("s3://u@b/k and https://a:b@c") == "s3://***@b/k and https://***@c"
    assert without_userinfo("git+ssh://git@github.com/x") == "git+ssh://***@github.com/x"
    assert without_userinfo("https://host/path?email=a@b") == "https://host/path?email=a@b"
