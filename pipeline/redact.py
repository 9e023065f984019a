"""Keep secrets out of everything MLflow stores: params, tags, logged configs, artifacts, error text.

Three kinds are masked: credentials inside URIs (`scheme://user:pass@host`), the values of
fields whose name says they hold a secret (`api_key`, `token`, `password`, `secret` ...), and
the literal values of such environment variables wherever they turn up in a string (an
exception message, a traceback, a URL someone pasted into a config).
"""

from __future__ import annotations

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


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not _NAMES_A_SECRET.search(name)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """The environment's secret values, longest first (so a secret containing another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


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
