"""The job's configuration as `_config.yaml` records it: resolved, with secrets redacted.

Values of secret-like keys (tokens, passwords, access keys, at any depth) are replaced, `${oc.env:...}`
interpolations are written as their text (never an environment variable's value), and the user:password@ of
any URL is dropped, so that the file can be shared with the data it describes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any

from pipeline.config.validate import without_userinfo

REDACTED = "<redacted>"
# A key is secret-like when one of its words (split at '_', '-', '.' and camelCase, case-insensitive) is one of
# these, or it contains one of SECRET_PHRASES (e.g. aws_secret_access_key, hf_token, accessKeyId, password).
SECRET_WORDS = frozenset(  # "key": fsspec/s3fs storage_options take the access key id as `key`
    {
        "token", "secret", "password", "passwd", "pwd", "credential", "credentials", "apikey", "passphrase",
        "key", "auth", "authorization", "bearer", "cookie", "cookies", "pat", "dsn",
    }
)  # fmt: skip
SECRET_PHRASES = ("api_key", "access_key", "session_token", "private_key", "connection_string", "conn_str")
_ENV_TEXT = "canvasflow_env_text"  # resolver that gives back `${oc.env:...}` as text (see _yaml)
_OC_ENV = re.compile(r"\$\{\s*oc\.env\s*:")
# A secret-like key's value that holds only `${oc.env:NAME}` texts, after an auth scheme at most, is kept; a
# default after the name (`${oc.env:NAME,default}`, a literal fallback secret) is redacted unless null.
_ENV_REFERENCE = re.compile(
    r"^((?:(?:bearer|basic|token)\s+)?\$\{oc\.env:[^${},]*)(?:,([^${}]*))?\}$", re.IGNORECASE
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def is_secret_key(key: Any) -> bool:
    return _is_secret_name(str(key))


# Cached: redact_text asks for each key of each line that Hydra prints before the job starts.
@functools.lru_cache(maxsize=4096)
def _is_secret_name(key: str) -> bool:
    name = _CAMEL.sub("_", key).lower().replace("-", "_")
    return bool(set(re.split(r"[^a-z0-9]+", name)) & SECRET_WORDS) or any(p in name for p in SECRET_PHRASES)


# `key=value` (an override) or `key: value` (YAML) in text that Hydra prints before the job starts: a compose
# error echoing an override, `--cfg job`, `--help`. A `${...}` interpolation is one value.
# A key starts where a run of key characters does (after digits or '-' at most: `--token=`): started at every
# letter of a long word, the search took time quadratic in its length (a 100 KB word: a minute).
# In a flow mapping, `key:value` too (Hydra's `{X-Api-Key:SECRET}`). A quoted value may hold a quote escaped
# with '\' (Hydra: "pre\" SECRET") or, in single quotes, doubled (YAML: 'it''s SECRET').
_ASSIGNED = re.compile(r"(?<![A-Za-z0-9_-])[0-9-]*(?P<key>[A-Za-z_][A-Za-z0-9_-]*)(?P<sep>=|:[ \t]*)")
_QUOTED = r"'(?:[^'\\\n]|\\.|'')*'|\"(?:[^\"\\\n]|\\.)*\""
_VALUE = re.compile(rf"\$\{{[^}}\n]*\}}|{_QUOTED}|[^\s,}}\]]+")
# In a flow mapping ({a: b, ...}) a plain value runs to the next ',', '}' or ']' (`{Authorization: Bearer X}`);
# a quoted one only when it ends there (YAML writes a quote in a quoted text as '': ''Bearer X'').
_FLOW_VALUE = re.compile(rf"\$\{{[^}}\n]*\}}|(?:{_QUOTED})(?=[ \t]*(?:[,}}\]\n]|$))|[^,}}\]\n]*[^\s,}}\]]")
# Hydra's label for the key an error is about; the logger that conf/config.yaml sets to WARNING (--cfg hydra)
_NOT_SECRETS = frozenset({"full_key", "botocore.credentials"})
# A YAML line as OmegaConf.to_yaml writes it (--cfg, --help, --info): `key: value`, `key:` before a nested block,
# or a list item.
_YAML_LINE = re.compile(
    r"^(?P<head>[ \t]*(?:- )*)(?:(?P<key>[A-Za-z_][A-Za-z0-9_.-]*):(?:[ \t]+(?P<value>.*?))?|(?P<item>\S.*?))[ \t]*$"
)


def redact_text(text: str) -> str:
    """`text` with the values of secret-like keys in `key=value` and `key: value` redacted as in redact()
    (null, booleans and `${oc.env:NAME}` kept) and the user:password@ of URLs dropped. A `{...}` or `[...]`
    value is redacted whole; in YAML, so is a value on the lines below its key (a nested block, a folded text)."""
    return without_userinfo(_redact_assigned(_redact_yaml_lines(text)))


def _redact_assigned(text: str) -> str:
    parts, pos, closing = [], 0, None
    line_start = seen = 0  # where the line of the last key found starts; text up to `seen` looked at for it
    while (match := _ASSIGNED.search(text, pos)) is not None:
        parts.append(text[pos : match.end()])
        # A value that is not redacted is searched too: `a=b.token=SECRET`, `x={key: SECRET}`.
        pos = match.end()
        key, start = match.group("key"), match.start("key")
        # The last character before the key on its line, found without going over the line again for each key
        # on it (that took time quadratic in a line's length: 100 KB of `a: ` in 50 ms, 10 MB in minutes).
        line_start, seen = text.rfind("\n", seen, start) + 1 or line_start, start
        before = start
        while before > line_start and text[before - 1].isspace():
            before -= 1
        last = text[before - 1] if before > line_start else ""
        flow = match.group("sep") != "=" and last in ("{", ",")
        if match.group("sep") != "=" and last and not flow and last != "-":
            continue  # `key: value` only as YAML has it (a line's first key, in {...}, a list item), not prose
        if match.group("sep") == ":" and not flow:
            continue  # `key:value` only in {...}: `token:abc` on a line is a text, `http://` no key
        if key in _NOT_SECRETS or not is_secret_key(key):
            continue
        if closing is None and text[match.end() : match.end() + 1] in ("{", "["):
            closing = _closing_brackets(text)
        end = _bracketed_end(text, match.end(), closing or {})
        if end is None:
            value = (_FLOW_VALUE if flow else _VALUE).match(text, match.end())
            if value is None:
                continue
            end = value.end()
        shown = text[match.end() : end].strip("'\"")
        if not _placeholder(shown) and not _ENV_REFERENCE.match(shown):
            parts.append(REDACTED)
            pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _closing_brackets(text: str) -> dict[int, int]:
    """Where each `{` or `[` of `text` that closes is closed (any of `}` and `]` closes either): the position
    after its closing bracket, by the position of the opening one."""
    closing, opened = {}, []
    for match in re.finditer(r"[{}\[\]]", text):
        if match.group() in "{[":
            opened.append(match.start())
        elif opened:
            closing[opened.pop()] = match.end()
    return closing


def _bracketed_end(text: str, start: int, closing: dict[int, int]) -> int | None:
    """Where the `{...}` or `[...]` starting at `start` ends (the end of its line when it does not close there
    or below); None when no bracket starts there. `closing` is _closing_brackets(text), found once per text:
    looking for each bracket's end on its own took time quadratic in the number of unclosed ones."""
    if start >= len(text) or text[start] not in "{[":
        return None
    if start in closing:
        return closing[start]
    newline = text.find("\n", start)
    return len(text) if newline < 0 else newline


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _redact_yaml_lines(text: str) -> str:
    """`text` with the YAML value of a secret-like key redacted where it runs past its line: a nested mapping or
    list below `key:`, or a text folded over the lines below, which are indented deeper than the key (list items
    of `key:` also at its indentation). A text folded below another key, or a list item, is joined onto one
    line where it holds a secret (`override_dirname: '...{aws_secret_access_key:` / `  SECRET}}'`)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line, i = lines[i], i + 1
        match = _YAML_LINE.match(line)
        if match is None or (match.group("item") is not None and "- " not in match.group("head")):
            out.append(line)
            continue
        key, value = match.group("key"), match.group("key") and match.group("value")
        column = len(match.group("head")) if key else _indent(line)
        end = i
        while end < len(lines) and lines[end].strip():
            below = _indent(lines[end])
            if not (
                below > column
                or (key and value is None and below == column and lines[end].lstrip()[:2] == "- ")
            ):
                break
            end += 1
        rest = [below.strip() for below in lines[i:end]]
        if key and key not in _NOT_SECRETS and is_secret_key(key):
            shown = " ".join([value or "", *rest]).strip()
            if not rest and (value is None or _placeholder(shown) or _ENV_REFERENCE.match(shown)):
                out.append(line)
            else:
                out.append(f"{match.group('head')}{key}: {REDACTED}")
                i = end
            continue
        scalar = value if key else match.group("item")
        joined = " ".join([scalar, *rest]) if scalar is not None and rest else None
        if joined is not None and _redact_assigned(joined) != joined:
            out.append(f"{match.group('head')}{key + ': ' if key else ''}{joined}")
            i = end
        else:
            out.append(line)
    return "\n".join(out)


def _placeholder(value: str) -> bool:
    """A value that is no secret: null, a boolean, or a usage text's placeholder (`key=value ...` in --help,
    `<redacted>`, `<YOUR_KEY>`)."""
    value = value.rstrip("\\")  # `key=value\` in a YAML text folded with `\ `
    return value.lower() in ("null", "none", "true", "false", "...", "value") or (
        value.startswith("<") and value.endswith(">")
    )


def _env_text(*args: Any) -> str:
    return "${oc.env:" + ",".join("null" if a is None else str(a) for a in args) + "}"


def _rewrite_env(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _rewrite_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_env(v) for v in node]
    if isinstance(node, str) and "${" in node:
        return _OC_ENV.sub("${" + _ENV_TEXT + ":", node)
    return node


def redact(node: Any, key: Any = None) -> Any:
    """Values of secret-like keys (is_secret_key) replaced by REDACTED, at any depth; None, booleans (e.g.
    `token: true`, "use the stored token") and `${oc.env:NAME}` texts (`Bearer ${oc.env:NAME}` too) are kept,
    the literal default of `${oc.env:NAME,default}` redacted. In every other text, the user:password@ of a URL
    becomes ***@."""
    if key is not None and is_secret_key(key):
        if node is None or isinstance(node, bool):
            return node
        reference = _ENV_REFERENCE.match(node) if isinstance(node, str) else None
        if reference is None:
            return REDACTED
        default = reference.group(2)
        if default is None or default.strip() in ("", "null"):
            return node
        return f"{reference.group(1)},'{REDACTED}'}}"
    if isinstance(node, dict):
        return {k: redact(v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    if isinstance(node, str):
        return without_userinfo(node)
    return node


def config_yaml(cfg: Any) -> str:
    """The config as written to `_config.yaml` (a DictConfig or a plain container): resolved, except that
    `${oc.env:...}` interpolations are written as their text (never an environment variable's value) and
    values of secret-like keys are redacted."""
    from omegaconf import DictConfig, OmegaConf

    if not OmegaConf.has_resolver(_ENV_TEXT):
        OmegaConf.register_new_resolver(_ENV_TEXT, _env_text)
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    # Resolved in a copy where oc.env gives back its own text: `${b}` with b=${oc.env:X}, "Bearer ${oc.env:X}"
    # and oc.env defaults all come out as text.
    resolved = OmegaConf.to_container(OmegaConf.create(_rewrite_env(raw)), resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(redact(resolved)))


def with_run_values(config_yaml: str, job: Any, run_id: str) -> str:
    """`config_yaml` (from config_yaml) recording the run's actual id (a derived one, or a nightly's from its date)
    and codec (the one it was started with: keep_run_codec)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config_yaml)
    OmegaConf.update(cfg, "run.id", run_id, force_add=True)
    OmegaConf.update(cfg, "output.compression", job.output.compression, force_add=True)
    return OmegaConf.to_yaml(cfg)


def secret_values(node: Any, key: Any = None) -> list[str]:
    """The texts (numbers as text) that redact() would replace in `node`: every one under a secret-like key, at
    any depth, longest first. What a message from code given them (a postprocess callable's exception) must
    not show."""
    if key is not None and is_secret_key(key):
        return sorted(set(_scalars(node)), key=len, reverse=True)
    if isinstance(node, dict):
        found = [v for k, child in node.items() for v in secret_values(child, k)]
    elif isinstance(node, list):
        found = [v for child in node for v in secret_values(child)]
    else:
        return []
    return sorted(set(found), key=len, reverse=True)


def _scalars(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for child in node.values() for v in _scalars(child)]
    if isinstance(node, list):
        return [v for child in node for v in _scalars(child)]
    text = str(node)
    if node is None or isinstance(node, bool) or len(text) < 4:
        return []  # shorter: no secret, and replacing it would mask other text
    scheme = _AUTH_SCHEME.match(text)  # "Bearer TOKEN": the token alone too
    return [text, scheme.group(1)] if scheme and len(scheme.group(1)) >= 4 else [text]


_AUTH_SCHEME = re.compile(r"^(?:bearer|basic|token)\s+(\S.*)$", re.IGNORECASE)


# Secret-like names that the shell sets to no secret: PWD (its "pwd" word is a password's in DB_PWD) is the
# working directory, a prefix of most paths a message names.
NOT_SECRET_VARIABLES = frozenset({"PWD"})


def environment_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the environment variables with secret-like names (HF_TOKEN, OPENAI_API_KEY,
    AWS_SECRET_ACCESS_KEY, ...) of 8 characters or more, longest first: what a postprocess callable may read
    itself and put into its exception, which errors/ must not show."""
    environ = os.environ if environ is None else environ
    found = {
        value.strip()
        for name, value in environ.items()
        if is_secret_key(name) and name not in NOT_SECRET_VARIABLES and len(value.strip()) >= 8
    }
    return sorted(found, key=len, reverse=True)


def known_secrets(node: Any) -> list[str]:
    """The secret-like values of `node` (secret_values: a postprocess stage's keyword arguments) and of this
    process's environment (environment_secrets: what `${oc.env:...}` resolves to, and what a callable may read
    itself), longest first: what no message and no record of a run may show, under whatever key."""
    return sorted({*secret_values(node), *environment_secrets()}, key=len, reverse=True)


def without_secret_texts(node: Any, secrets: list[str]) -> Any:
    """`node` (JSON-like) with `secrets` removed from each of its texts, at any depth (without_secrets)."""
    if isinstance(node, dict):
        return {k: without_secret_texts(v, secrets) for k, v in node.items()}
    if isinstance(node, list):
        return [without_secret_texts(v, secrets) for v in node]
    return without_secrets(node, secrets) if isinstance(node, str) else node


def without_secrets(text: str, secrets: list[str]) -> str:
    """`text` with each of `secrets` (from secret_values), also as a URL's query or path encodes it, replaced
    by REDACTED; the user:password@ of URLs dropped."""
    from urllib.parse import quote, quote_plus

    for secret in secrets:
        for shown in dict.fromkeys((secret, quote_plus(secret), quote(secret, safe=""), quote(secret))):
            text = text.replace(shown, REDACTED)
    return without_userinfo(text)
