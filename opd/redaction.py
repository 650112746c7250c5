"""Keeping secrets inside the process: marking secret config fields, and redacting them on the way out.

Owns the marker a config field carries when its value is a secret
(`json_schema_extra=SECRET`: the whole value is hidden; `SECRET_URL`: only the
password inside the URL is), the redacted view of a config that every
outward path uses (`--print-config`, the config uploaded to W&B, anything a
status page shows: `redacted_dump`), and the scrubbing of free text (log
lines, error messages: `redact_text`) for URL passwords, password / token
query parameters and bearer tokens. A log filter applies it to every record
of the process's handler (`opd.logs`).

Does not hide secrets from the process itself: configs keep the real values.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pydantic import BaseModel

SECRET: dict[str, Any] = {"secret": True}
SECRET_URL: dict[str, Any] = {"secret": "url"}
REDACTED = "<redacted>"

_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s/]+)(?=@)")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:password|passwd|pass|token|secret|access_token)=)(?P<secret>[^&#\s]+)", re.I
)
_BEARER = re.compile(r"(?P<head>\b(?:Bearer|Basic)\s+)(?P<secret>[A-Za-z0-9._~+/=-]{4,})", re.I)


def redact_url(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` URL and secret query parameters replaced."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    return _QUERY_SECRET.sub(lambda m: m["head"] + REDACTED, text)


def redact_text(text: str) -> str:
    """`redact_url` plus `Bearer <token>` / `Basic <credentials>`: for log lines and error messages."""
    return _BEARER.sub(lambda m: m["head"] + REDACTED, redact_url(text))


def secret_kind(extra: Any) -> bool | str | None:
    """The marker of a field's `json_schema_extra`: True (whole value), "url" (its password), None."""
    return extra.get("secret") if isinstance(extra, dict) else None


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


def _redact_into(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(model).model_fields.items():
        if name not in dumped:
            continue
        value = getattr(model, name)
        kind = secret_kind(field.json_schema_extra)
        if isinstance(value, BaseModel) and isinstance(dumped[name], dict):
            dumped[name] = _redact_into(value, dumped[name])
        elif (
            isinstance(value, dict)
            and isinstance(dumped[name], dict)
            and any(isinstance(v, BaseModel) for v in value.values())
        ):  # a mapping of sub-configs (e.g. the trainer's `teachers`): each one redacted as a model
            dumped[name] = {
                k: _redact_into(v, dumped[name][k]) if isinstance(v, BaseModel) else _scrub(dumped[name][k])
                for k, v in value.items()
            }
        elif kind is True:
            dumped[name] = REDACTED if dumped[name] not in (None, "", [], {}) else dumped[name]
        else:  # "url", and every other string: a URL with a password in it is redacted wherever it is
            dumped[name] = _scrub(dumped[name])
    return dumped


def redacted_dump(model: BaseModel, **dump_kwargs: Any) -> dict[str, Any]:
    """`model.model_dump(mode="json")` with secret fields hidden and URL passwords removed, at any depth."""
    return _redact_into(model, model.model_dump(mode="json", **dump_kwargs))


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with `redact_text` (URL passwords, bearer tokens) before it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # formatters reuse a cached exc_text: cache it redacted
            record.exc_text = redact_text(_FORMATTER.formatException(record.exc_info))
        return True


_FORMATTER = logging.Formatter()
