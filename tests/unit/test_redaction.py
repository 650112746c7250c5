"""Redaction of secrets: URL passwords, bearer tokens, fields marked secret; in dumps, errors and log lines."""

from __future__ import annotations

import io
import logging

import pytest
from pydantic import Field

from opd.config import ConfigError, ConfigModel, validate_config
from opd.redaction import REDACTED, SECRET, SECRET_URL, RedactingFilter, redact_text, redact_url, redacted_dump

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "text,secret",
    [
        ("redis://:pw-1@redis:6379/0", "pw-1"),
        ("rediss://default:pw-2@10.0.0.5:6380/1", "pw-2"),
        ("connect to redis://user:p%40ss-3@host/0 failed", "p%40ss-3"),
        ("redis://host:6379/0?password=pw-4&db=2", "pw-4"),
        ("https://x.test/api?token=tok-5", "tok-5"),
    ],
)
def test_redact_url_removes_the_password_and_keeps_the_rest(text, secret):
    clean = redact_url(text)
    assert secret not in clean and REDACTED in clean
    assert clean.replace(REDACTED, secret) == text  # nothing else changed (host, port, db stay visible)


def test_redact_url_leaves_urls_without_passwords_alone():
    for text in ("redis://redis:6379/0", "unix:///tmp/r.sock", "dns:///teacher:50051", "user@host", "a:b@c"):
        assert redact_url(text) == text


def test_redact_text_hides_bearer_and_basic_credentials():
    assert "tok-6" not in redact_text("authorization: Bearer tok-6")
    assert "dXNlcjpwdw==" not in redact_text("Authorization: Basic dXNlcjpwdw==")


class _Inner(ConfigModel):
    url: str = Field("redis://127.0.0.1:6379/0", json_schema_extra=SECRET_URL)
    note: str = "plain"


class _Outer(ConfigModel):
    token: str | None = Field(None, json_schema_extra=SECRET)
    inner: _Inner = Field(default_factory=_Inner)
    targets: list[str] = Field(default_factory=list)
    count: int = 3


def test_redacted_dump_hides_secret_fields_at_any_depth():
    config = _Outer(
        token="tok-7",
        inner=_Inner(url="redis://:pw-8@r:6379/0", note="see redis://u:pw-9@x/0"),
        targets=["redis://:pw-10@y/0", "plain"],
    )
    dumped = redacted_dump(config)
    assert dumped == {
        "token": REDACTED,
        "inner": {"url": f"redis://:{REDACTED}@r:6379/0", "note": f"see redis://u:{REDACTED}@x/0"},
        "targets": [f"redis://:{REDACTED}@y/0", "plain"],
        "count": 3,
    }
    assert config.token == "tok-7" and "pw-8" in config.inner.url  # the process keeps the real values
    assert redacted_dump(_Outer())["token"] is None  # an unset secret stays visibly unset


def test_validation_errors_never_echo_a_secret():
    with pytest.raises(ConfigError) as err:
        validate_config(_Outer, {"token": ["tok-11"], "count": 1})
    assert "tok-11" not in str(err.value) and "token" in str(err.value) and REDACTED in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_config(_Outer, {"inner": {"url": 5}, "count": "redis://:pw-12@x/0"})
    assert "pw-12" not in str(err.value) and "count" in str(err.value)


def test_log_filter_redacts_messages_arguments_and_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s with %s", "redis://:pw-13@r/0", "Bearer tok-14")
        try:
            raise RuntimeError("cannot reach redis://:pw-15@r/0")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for secret in ("pw-13", "tok-14", "pw-15"):
        assert secret not in out
    assert "connecting to redis://" in out and "RuntimeError: cannot reach" in out and "Traceback" in out
