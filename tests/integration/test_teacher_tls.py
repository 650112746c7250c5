"""The teacher over TLS and mutual TLS (throwaway CAs), and certificates / tokens rotated under a running server."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from teacher_server.client import TeacherClientError, TeacherClientSync, Unauthenticated
from tests.fixtures.teacher import start_teacher
from tests.fixtures.tls import TestCA, write_atomically

pytestmark = pytest.mark.timeout(180)

IDS = np.arange(1, 9)
REFUSE_TIMEOUT_S = 2.0  # a refused handshake is retried as UNAVAILABLE until this deadline, then raised


def _score(address: str, **client_kwargs) -> np.ndarray:
    with TeacherClientSync(address, timeout_s=client_kwargs.pop("timeout_s", 60), **client_kwargs) as client:
        return client.score(IDS, 3, top_k=2).token_logprobs


def _requests_total(ops_url: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{ops_url}/metrics").text):
        for s in family.samples:
            if s.name == "opd_teacher_requests_total" and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _trusting(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.ca.configure_trust(ctx)
    return ctx


def _poll(check, what: str, deadline_s: float = 30.0):
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return check()
        except Exception as exc:  # the last error is re-raised with context below
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still failing after {deadline_s:.0f} s") from exc
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cas(tmp_path_factory) -> tuple[TestCA, TestCA]:
    directory = tmp_path_factory.mktemp("tls")
    return TestCA(directory, "ca1"), TestCA(directory, "ca2")


@pytest.fixture(scope="module")
def tls_teacher(tiny_model_dir, cas):
    ca1, _ = cas
    grpc_cert, ops_cert = ca1.server_cert(stem="grpc"), ca1.server_cert(stem="ops")
    server = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={"tls_cert_file": str(grpc_cert.cert), "tls_key_file": str(grpc_cert.key)},
        ops={"tls_cert_file": str(ops_cert.cert), "tls_key_file": str(ops_cert.key)},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_teacher(tiny_model_dir, cas):
    ca1, _ = cas
    cert = ca1.server_cert(stem="mtls")
    server = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={"tls_cert_file": str(cert.cert), "tls_key_file": str(cert.key), "tls_client_ca_file": str(ca1.ca_file)},
        auth={"cert_clients": {"student-a": "alice", "student-b.clients.test": "bob"}},
    )
    yield server
    server.stop()


def test_score_over_tls_matches_plaintext_scores(tls_teacher, cas, tiny_model_dir):
    ca1, _ = cas
    scored = _score(tls_teacher.address, tls_ca_file=str(ca1.ca_file), tls_server_name="localhost")
    plain = start_teacher(tiny_model_dir, "hf")
    try:
        expected = _score(plain.address)
    finally:
        plain.stop()
    np.testing.assert_array_equal(scored, expected)  # same model, same engine: TLS changes nothing but the pipe


def test_client_trusting_another_ca_is_refused(tls_teacher, cas):
    _, ca2 = cas
    with pytest.raises(TeacherClientError) as err:
        _score(tls_teacher.address, tls_ca_file=str(ca2.ca_file), timeout_s=REFUSE_TIMEOUT_S)
    assert "UNAUTHENTICATED" not in str(err.value)  # refused by the handshake, before any RPC


def test_plaintext_client_is_refused_by_a_tls_port(tls_teacher):
    with pytest.raises(TeacherClientError):
        _score(tls_teacher.address, timeout_s=REFUSE_TIMEOUT_S)


def test_ops_port_serves_https_with_the_configured_certificate(tls_teacher, cas):
    ca1, ca2 = cas
    assert tls_teacher.ops_url.startswith("https://")
    assert httpx.get(f"{tls_teacher.ops_url}/healthz", verify=_trusting(ca1)).json()["status"] == "ok"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_teacher.ops_url}/healthz", verify=_trusting(ca2))
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_teacher.ops_url.replace("https://", "http://") + "/healthz")


def test_mtls_client_certificate_names_the_client(mtls_teacher, cas):
    ca1, _ = cas
    alice = ca1.client_cert("student-a")  # mapped by its CN
    bob = ca1.client_cert("student-b")  # mapped by its SAN
    common = {"tls_ca_file": str(ca1.ca_file), "tls_server_name": "localhost", "client_name": "mallory"}
    _score(mtls_teacher.address, tls_cert_file=str(alice.cert), tls_key_file=str(alice.key), **common)
    _score(mtls_teacher.address, tls_cert_file=str(bob.cert), tls_key_file=str(bob.key), **common)
    url = mtls_teacher.ops_url
    assert _requests_total(url, client="alice", code="OK") == 1
    assert _requests_total(url, client="bob", code="OK") == 1
    assert _requests_total(url, client="mallory") == 0  # a self-declared name does not count under mTLS


def test_mtls_refuses_a_client_without_certificate(mtls_teacher, cas):
    ca1, _ = cas
    with pytest.raises(TeacherClientError) as err:
        _score(
            mtls_teacher.address, tls_ca_file=str(ca1.ca_file), tls_server_name="localhost", timeout_s=REFUSE_TIMEOUT_S
        )
    assert not isinstance(err.value, Unauthenticated)  # the handshake itself fails


def test_mtls_refuses_certificates_of_another_ca_or_not_mapped(mtls_teacher, cas):
    ca1, ca2 = cas
    stranger = ca2.client_cert("student-a")  # the right name, signed by the wrong CA
    with pytest.raises(TeacherClientError):
        _score(
            mtls_teacher.address,
            tls_ca_file=str(ca1.ca_file),
            tls_server_name="localhost",
            tls_cert_file=str(stranger.cert),
            tls_key_file=str(stranger.key),
            timeout_s=REFUSE_TIMEOUT_S,
        )
    unmapped = ca1.client_cert("student-z")
    with pytest.raises(Unauthenticated, match="not listed"):
        _score(
            mtls_teacher.address,
            tls_ca_file=str(ca1.ca_file),
            tls_server_name="localhost",
            tls_cert_file=str(unmapped.cert),
            tls_key_file=str(unmapped.key),
        )


def test_rotated_certificates_are_served_without_a_restart(tiny_model_dir, tmp_path):
    old_ca, new_ca = TestCA(tmp_path, "old"), TestCA(tmp_path, "new")
    grpc_cert, ops_cert = old_ca.server_cert(stem="grpc"), old_ca.server_cert(stem="ops")
    server = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={"tls_cert_file": str(grpc_cert.cert), "tls_key_file": str(grpc_cert.key)},
        ops={"tls_cert_file": str(ops_cert.cert), "tls_key_file": str(ops_cert.key)},
    )
    try:
        _score(server.address, tls_ca_file=str(old_ca.ca_file))
        new_ca.server_cert(grpc_cert)  # cert and key replaced in place (two renames), as a renewal does
        new_ca.server_cert(ops_cert)
        _poll(lambda: _score(server.address, tls_ca_file=str(new_ca.ca_file), timeout_s=5), "gRPC with the new CA")
        with pytest.raises(TeacherClientError):  # new connections no longer get the old certificate
            _score(server.address, tls_ca_file=str(old_ca.ca_file), timeout_s=REFUSE_TIMEOUT_S)
        _poll(lambda: httpx.get(f"{server.ops_url}/healthz", verify=_trusting(new_ca)).raise_for_status(), "ops")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.ops_url}/healthz", verify=_trusting(old_ca))
    finally:
        server.stop()


def test_half_written_renewal_keeps_the_previous_certificate(tiny_model_dir, tmp_path):
    old_ca, new_ca = TestCA(tmp_path, "old"), TestCA(tmp_path, "new")
    grpc_cert, ops_cert = old_ca.server_cert(stem="grpc"), old_ca.server_cert(stem="ops")
    server = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={"tls_cert_file": str(grpc_cert.cert), "tls_key_file": str(grpc_cert.key)},
        ops={"tls_cert_file": str(ops_cert.cert), "tls_key_file": str(ops_cert.key)},
    )
    try:
        renewed = new_ca.server_cert(stem="renewed")
        for paths in (grpc_cert, ops_cert):  # the new certificate is written; its key not yet
            write_atomically(paths.cert, renewed.cert.read_bytes())
        _score(server.address, tls_ca_file=str(old_ca.ca_file))  # still the previous pair
        assert httpx.get(f"{server.ops_url}/healthz", verify=_trusting(old_ca)).status_code == 200
        for paths in (grpc_cert, ops_cert):
            write_atomically(paths.cert, b"-----BEGIN CERTIFICATE-----\ntruncated")
        _score(server.address, tls_ca_file=str(old_ca.ca_file))
        assert httpx.get(f"{server.ops_url}/healthz", verify=_trusting(old_ca)).status_code == 200
        for paths in (grpc_cert, ops_cert):  # the renewal completes
            write_atomically(paths.cert, renewed.cert.read_bytes())
            write_atomically(paths.key, renewed.key.read_bytes())
        _poll(lambda: _score(server.address, tls_ca_file=str(new_ca.ca_file), timeout_s=5), "gRPC with the new CA")
        _poll(lambda: httpx.get(f"{server.ops_url}/healthz", verify=_trusting(new_ca)).raise_for_status(), "ops")
    finally:
        server.stop()


def test_rotated_tokens_file_is_read_without_a_restart(tiny_model_dir, tmp_path: Path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"alice": "old-token-1"}))
    server = start_teacher(tiny_model_dir, "hf", auth={"tokens_file": str(tokens)})
    try:
        _score(server.address, token="old-token-1")
        write_atomically(tokens, yaml.safe_dump({"alice": "new-token-2", "bob": "bob-token-3"}).encode())
        _score(server.address, token="new-token-2")
        _score(server.address, token="bob-token-3")
        with pytest.raises(Unauthenticated):
            _score(server.address, token="old-token-1")
        bearer = {"Authorization": "Bearer new-token-2"}
        assert httpx.get(f"{server.ops_url}/v1/info", headers=bearer).status_code == 200
        assert (
            httpx.get(f"{server.ops_url}/v1/info", headers={"Authorization": "Bearer old-token-1"}).status_code == 401
        )
    finally:
        server.stop()
