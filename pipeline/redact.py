"""Keep secrets out of everything MLflow stores: params, tags, logged configs, artifacts, error text.

Three kinds are masked: credentials inside URIs (`scheme://user:pass@host`), the values of
fields whose name says they hold a secret (`api_key`, `token`, `password`, `secret` ...), and
the literal values of secret variables wherever they turn up in a string (an exception message,
a traceback, a URL someone pasted into a config). A variable is secret when its name says so or
when a config names it as one (`judge.api_key_env: JUDGE_KEY`, see `add_secret_names`); its
value is matched without surrounding whitespace, so a key read from a file with its newline is
masked too.

One redaction for every text loraforge writes or prints: MLflow, errors, logs (`LogFilter`),
run state, `--json`, reports and job entrypoints all go through `redact_text` / `redact`.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/@\s:]+(?::[^/@\s]*)?)@")
# a field or variable holding a secret, matched on whole name parts (`max_new_tokens` is not one);
# `api_key_env` and the like name a variable, they are not one
_SECRET_NAME = re.compile(r"(^|[._-])(api[_-]?key|token|password|passwd|secret|credentials?|authorization)($|[._-])",
                          re.I)
_NAMES_A_SECRET = re.compile(r"[._-](env|var|file|path)$", re.I)
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask innocent text
# variables a loaded config names as secrets (judge.api_key_env), whatever their names say
_NAMED_SECRETS: set[str] = set()


def add_secret_names(*names: str | None) -> None:
    """Treat these environment variables as secrets from now on (a config named them as such)."""
    _NAMED_SECRETS.update(n for n in names if n)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not _NAMES_A_SECRET.search(name)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The environment's secret values, longest first (so a secret containing another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {v.strip() for k, v in env.items() if is_secret_name(k) or k in _NAMED_SECRETS}
    return sorted((v for v in values if len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """`text` with URI credentials and the environment's secret values masked."""
    text = _URI_CREDENTIALS.sub(lambda m: m["scheme"] + MASK + "@", text)
    for value in secrets if secrets is not None else secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(value: Any, key: str = "", secrets: list[str] | None = None) -> Any:
    """A copy of `value` (nested dicts, lists, strings) with every secret masked; `key` is its field name."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key, secrets) for v in value)
    if isinstance(value, str):
        if key and is_secret_name(key.rsplit(".", 1)[-1]) and value:
            return MASK
        return redact_text(value, secrets)
    return value


def restore(masked: Any, source: Any) -> Any:
    """`masked` (what `redact` made of some data) with each masked value taken back from `source`, where
    `source` has a value at the same place that masks to it; other masked values stay masked."""
    if isinstance(masked, dict):
        source = source if isinstance(source, dict) else {}
        return {k: restore(v, source.get(k)) for k, v in masked.items()}
    if isinstance(masked, list):
        source = source if isinstance(source, list) and len(source) == len(masked) else [None] * len(masked)
        return [restore(v, s) for v, s in zip(masked, source)]
    if isinstance(masked, str) and MASK in masked and isinstance(source, str) and (
            masked == MASK or redact_text(source) == masked):
        return source
    return masked


class LogFilter(logging.Filter):
    """Masks secrets in every record that passes a handler (message and arguments formatted first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put `LogFilter` on every handler of `logger` (default: the root logger)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, LogFilter) for f in handler.filters):
            handler.addFilter(LogFilter())
