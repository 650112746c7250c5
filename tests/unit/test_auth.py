"""Token tables and client identity: constant-time comparison, reload on change, certificate mapping."""

from __future__ import annotations

import base64
import hmac
import logging

import pytest
import yaml

from opd.auth import AuthError, BearerAuth, TeamPolicy, TokenTable, presented_token, read_tokens_file
from opd.config import ConfigError
from teacher_server.auth import Authenticator
from teacher_server.config import AuthConfig
from teacher_server.errors import Unauthenticated
from tests.fixtures.tls import write_atomically

pytestmark = pytest.mark.timeout(30)


def _tokens_file(path, mapping):
    write_atomically(path, yaml.safe_dump(mapping).encode())
    return str(path)


def test_lookup_names_the_client_and_refuses_unknown_tokens(tmp_path):
    table = TokenTable(_tokens_file(tmp_path / "t.yaml", {"alice": "tok-a", "bob": "tok-b"}))
    assert table.lookup("tok-a") == "alice" and table.lookup("tok-b") == "bob"
    for wrong in ("tok-", "tok-ab", "TOK-A", "", "tok-a ", "ünïcode"):
        assert table.lookup(wrong) is None


def test_every_known_token_is_compared_with_compare_digest(tmp_path, monkeypatch):
    """Regression: a plain `==` (or stopping at the first match) would leak timing; all go through compare_digest."""
    table = TokenTable(_tokens_file(tmp_path / "t.yaml", {"alice": "tok-a", "bob": "tok-b", "carol": "tok-c"}))
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert table.lookup("tok-a") == "alice"  # the first entry matches: the other two are still compared
    assert len(calls) == 3
    assert table.lookup("x" * 500) is None
    assert len(calls) == 6 and all(a == b == 32 for a, b in calls)  # digests: the length of the token is not timed


def test_tokens_file_is_reloaded_when_it_changes(tmp_path):
    path = tmp_path / "t.yaml"
    table = TokenTable(_tokens_file(path, {"alice": "old"}))
    assert table.lookup("old") == "alice"
    _tokens_file(path, {"alice": "new", "bob": "other"})
    assert table.lookup("new") == "alice" and table.lookup("other") == "bob"
    assert table.lookup("old") is None


def test_a_broken_tokens_file_keeps_the_previous_tokens_and_logs_no_token(tmp_path, caplog):
    path = tmp_path / "t.yaml"
    table = TokenTable(_tokens_file(path, {"alice": "s3cret-old"}))
    write_atomically(path, b"alice: [s3cret-new\n")  # half-written YAML
    with caplog.at_level(logging.WARNING):
        assert table.lookup("s3cret-old") == "alice"
    assert "keeping the previous tokens" in caplog.text
    assert "s3cret" not in caplog.text
    _tokens_file(path, {"alice": "s3cret-fixed"})
    assert table.lookup("s3cret-fixed") == "alice" and table.lookup("s3cret-old") is None


@pytest.mark.parametrize(
    "content,message",
    [
        ("- s3cret-1\n- s3cret-2\n", "must be a YAML mapping"),
        ("'bad name': s3cret-3\n", "must be 1-64"),
        ("alice: ''\nbob: s3cret-4\n", "non-empty"),
        ("alice: [s3cret-5\n", "not valid YAML"),
    ],
)
def test_malformed_tokens_file_at_start_is_a_clear_error_without_tokens(tmp_path, content, message):
    path = tmp_path / "t.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        TokenTable(str(path))
    assert "s3cret" not in str(err.value)


def test_presented_token_reads_bearer_and_basic():
    assert presented_token([("Authorization", "Bearer abc")]) == "abc"
    assert presented_token([("authorization", "bearer  abc ")]) == "abc"
    basic = base64.b64encode(b"anyone:abc").decode()
    assert presented_token([("Authorization", f"Basic {basic}")]) == "abc"
    assert presented_token([("Authorization", "Basic !!notbase64")]) is None
    assert presented_token([("Authorization", "Token abc")]) is None
    assert presented_token([]) is None


def test_bearer_auth_errors_say_what_is_missing(tmp_path):
    auth = BearerAuth(TokenTable(_tokens_file(tmp_path / "t.yaml", {"alice": "tok-a"})))
    assert auth.check([("authorization", "Bearer tok-a")]) == "alice"
    with pytest.raises(AuthError, match="missing"):
        auth.check([])
    with pytest.raises(AuthError, match="unknown bearer token") as err:
        auth.check([("authorization", "Bearer tok-b")])
    assert "tok-b" not in str(err.value)


# -- the teacher's identity: tokens and certificates ------------------------------------------------


def _cert_context(cn: str, *sans: str) -> dict[str, list[bytes]]:
    return {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [cn.encode()],
        "x509_subject_alternative_name": [s.encode() for s in sans],
    }


def test_teacher_without_auth_takes_the_declared_name():
    auth = Authenticator(AuthConfig())
    assert not auth.enabled
    assert auth.identify([("x-opd-client", "alice")]) == "alice"
    assert auth.identify([("x-opd-client", "bad name!")]) == "anonymous"
    assert auth.identify([]) == "anonymous"


def test_teacher_certificate_mapping_by_cn_or_san():
    auth = Authenticator(AuthConfig(cert_clients={"student-a": "alice", "b.clients.test": "bob"}))
    assert auth.enabled
    assert auth.identify([("x-opd-client", "mallory")], _cert_context("student-a")) == "alice"
    assert auth.identify([], _cert_context("whatever", "b.clients.test")) == "bob"
    with pytest.raises(Unauthenticated, match="not listed"):
        auth.identify([], _cert_context("student-z", "z.clients.test"))
    with pytest.raises(Unauthenticated, match="no client certificate"):
        auth.identify([], {})
    with pytest.raises(Unauthenticated, match="HTTP request"):  # HTTP has no certificate: never open by default
        auth.identify([("x-opd-client", "alice")], None)


def test_teacher_certificate_and_token_must_name_the_same_client(tmp_path):
    tokens = _tokens_file(tmp_path / "t.yaml", {"alice": "tok-a", "bob": "tok-b"})
    auth = Authenticator(AuthConfig(tokens_file=tokens, cert_clients={"student-a": "alice"}))
    assert auth.identify([("authorization", "Bearer tok-a")], _cert_context("student-a")) == "alice"
    with pytest.raises(Unauthenticated, match="names client 'alice' but the bearer token names 'bob'"):
        auth.identify([("authorization", "Bearer tok-b")], _cert_context("student-a"))
    with pytest.raises(Unauthenticated, match="missing"):
        auth.identify([], _cert_context("student-a"))
    assert auth.check([("authorization", "Bearer tok-b")]) == "bob"  # HTTP: the token alone
    with pytest.raises(AuthError):
        auth.check([("authorization", "Bearer tok-x")])


def test_teacher_tokens_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEST_TOKENS", "carol:tok-c, dave:tok-d")
    tokens = _tokens_file(tmp_path / "t.yaml", {"alice": "tok-a"})
    auth = Authenticator(AuthConfig(tokens_file=tokens, tokens_env="OPD_TEST_TOKENS"))
    for token, name in (("tok-a", "alice"), ("tok-c", "carol"), ("tok-d", "dave")):
        assert auth.identify([("authorization", f"Bearer {token}")]) == name
    monkeypatch.setenv("OPD_TEST_TOKENS", "carol")
    with pytest.raises(ConfigError, match="name:token") as err:
        Authenticator(AuthConfig(tokens_env="OPD_TEST_TOKENS"))
    assert "OPD_TEST_TOKENS" in str(err.value)


# -- team weights and caps in the tokens file --------------------------------------------------------


def test_tokens_file_mixes_the_plain_and_the_team_form(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "alice: tok-a\n"
        "team-b: {token: tok-b, weight: 2, max_queued_tokens: 5000}\n"
        "team-c:\n  token: tok-c\n  max_queued_requests: 3\n"
    )
    parsed = read_tokens_file(str(path))
    assert parsed.tokens == {"tok-a": "alice", "tok-b": "team-b", "tok-c": "team-c"}
    assert parsed.policies == {
        "team-b": TeamPolicy(weight=2.0, max_queued_tokens=5000),
        "team-c": TeamPolicy(weight=1.0, max_queued_requests=3),
    }
    table = TokenTable(str(path))
    assert table.lookup("tok-b") == "team-b" and table.lookup("tok-a") == "alice"
    assert table.policy("team-b").weight == 2.0 and table.policy("alice") == TeamPolicy()
    assert table.policy("not-in-the-file") == TeamPolicy()


@pytest.mark.parametrize(
    "entry,message",
    [
        ("{token: s3cret-1, weight: 0}", r"line 2: weight must be a number > 0 \(got 0\)"),
        ("{token: s3cret-2, weight: heavy}", "line 2: weight must be a number > 0"),
        ("{token: s3cret-3, max_queued_tokens: 1.5}", "line 2: max_queued_tokens must be a whole number >= 1"),
        ("{token: s3cret-4, max_queued_requests: -1}", "max_queued_requests must be a whole number >= 1"),
        ("{token: s3cret-5, wieght: 2}", r"client 'team-b' has unknown key\(s\) \['wieght'\]"),
        ("{weight: 2}", "client 'team-b' needs `token:`"),
        ("[s3cret-6]", "the entry of client 'team-b' must be `name: token` or"),
    ],
)
def test_a_malformed_team_entry_names_the_line_the_team_and_the_fix(tmp_path, entry, message):
    path = tmp_path / "t.yaml"
    path.write_text(f"alice: s3cret-0\nteam-b: {entry}\n")
    with pytest.raises(ConfigError, match=message) as err:
        TokenTable(str(path))
    assert "s3cret" not in str(err.value)


def test_an_edit_of_weights_is_picked_up_and_a_bad_edit_keeps_the_last_good_table(tmp_path, caplog):
    path = tmp_path / "t.yaml"
    table = TokenTable(_tokens_file(path, {"team-a": {"token": "tok-a", "weight": 2}}))
    assert table.policy("team-a").weight == 2.0
    _tokens_file(path, {"team-a": {"token": "tok-a", "weight": 5, "max_queued_requests": 7}})
    assert table.lookup("tok-a") == "team-a"  # every request checks the file
    assert table.policy("team-a") == TeamPolicy(weight=5.0, max_queued_requests=7)
    _tokens_file(path, {"team-a": {"token": "tok-a", "weight": -1}})
    with caplog.at_level(logging.WARNING):
        assert table.lookup("tok-a") == "team-a"
    assert "weight must be a number > 0" in caplog.text and "keeping the previous tokens" in caplog.text
    assert table.policy("team-a").weight == 5.0


def test_the_teacher_authenticator_reports_the_team_policy(tmp_path):
    tokens = _tokens_file(tmp_path / "t.yaml", {"alice": "tok-a", "bob": {"token": "tok-b", "weight": 3}})
    auth = Authenticator(AuthConfig(tokens_file=tokens))
    assert auth.identify([("authorization", "Bearer tok-b")]) == "bob"
    assert auth.policy("bob").weight == 3.0 and auth.policy("alice").weight == 1.0
