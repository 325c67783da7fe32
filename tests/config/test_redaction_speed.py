"""redact_text runs on every line Hydra prints before the job starts (`--cfg job`, a compose error echoing an
override) and without_userinfo on error messages: their time must grow with a text's length, not its square."""

from __future__ import annotations

import time

import pytest

from pipeline.config.redact import REDACTED, redact_text
from pipeline.config.validate import without_userinfo


def _seconds(function, text: str) -> float:
    start = time.perf_counter()
    function(text)
    return time.perf_counter() - start


@pytest.mark.parametrize(
    "text",
    [
        "data.hf_kwargs.prompt=" + "x" * 100_000,  # a long word: a key was looked for at each of its letters
        "a-" * 50_000,
        "token=[\n" * 12_500,  # each unclosed bracket was followed to the end of the text
    ],
    ids=["long-word", "dashed-word", "unclosed-brackets"],
)
def test_redact_text_of_100_kb_takes_linear_time(text):
    # Before: 55 s, 28 s, 43 s; now a few ms each.
    assert _seconds(redact_text, text) < 0.5
    assert _seconds(redact_text, text * 4) < 2.0  # 400 KB


def test_redact_text_of_a_5_mb_cfg_job_output_takes_seconds_at_most():
    keys = "".join(f"  key_{i}: value {i}\n" for i in range(200_000))
    text = f"postprocess:\n{keys}  token: hf_SECRET\n"
    start = time.perf_counter()
    redacted = redact_text(text)
    assert time.perf_counter() - start < 15.0  # before: 45 s (10 MB: 90 s); now 2 s
    assert "hf_SECRET" not in redacted and f"  token: {REDACTED}\n" in redacted


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
def test_without_userinfo_of_100_kb_takes_linear_time(text):
    # Before: 20 s, 4.7 s, 3.7 s; now a few ms each.
    assert _seconds(without_userinfo, text) < 0.5
    assert _seconds(without_userinfo, text * 4) < 2.0  # 400 KB


def test_without_userinfo_drops_the_same_user_and_password_as_before():
    assert without_userinfo("see http://KEY:SE/CRET@host/x") == "see http://***@host/x"
    assert without_userinfo("s3://u@b/k and https://a:b@c") == "s3://***@b/k and https://***@c"
    assert without_userinfo("git+ssh://git@github.com/x") == "git+ssh://***@github.com/x"
    assert without_userinfo("https://host/path?email=a@b") == "https://host/path?email=a@b"
