"""Certificate files: clear errors for bad ones, and change detection that never swaps in a half-written pair."""

from __future__ import annotations

import pytest

from opd.config import ConfigError, validate_config
from opd.ops_app import OpsConfig
from opd.tls import CertFiles, CertWatch, grpc_channel_credentials
from teacher_server.client import TeacherClient
from teacher_server.config import TeacherConfig
from tests.fixtures.tls import TestCA, write_atomically

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def ca(tmp_path) -> TestCA:
    return TestCA(tmp_path, "ca")


def test_bad_certificate_files_are_config_errors_naming_the_option(ca, tmp_path):
    good = ca.server_cert()
    other = ca.server_cert(stem="other")
    with pytest.raises(ConfigError, match=r"grpc.tls_cert_file '.*missing.pem' cannot be read"):
        CertFiles(str(tmp_path / "missing.pem"), str(good.key), option="grpc").load()
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="grpc.tls_key_file .* is not a PEM file"):
        CertFiles(str(good.cert), str(not_pem), option="grpc").load()
    with pytest.raises(ConfigError, match="cannot be used together"):
        CertFiles(str(good.cert), str(other.key), option="grpc").load()
    with pytest.raises(ConfigError, match="grpc.tls_client_ca_file .* no usable CA"):
        CertFiles(str(good.cert), str(good.key), str(good.key), option="grpc").load()
    cert, key, client_ca = CertFiles(str(good.cert), str(good.key), str(ca.ca_file)).load()
    assert cert.startswith(b"-----BEGIN CERTIFICATE") and b"PRIVATE KEY" in key and client_ca


def test_watch_reports_a_change_once_and_skips_a_mismatched_pair(ca):
    paths = ca.server_cert()
    watch = CertWatch(CertFiles(str(paths.cert), str(paths.key)))
    first = watch.current
    assert watch.changed() is None  # nothing changed
    renewed = ca.server_cert(stem="renewed")
    write_atomically(paths.cert, renewed.cert.read_bytes())  # the key is not written yet
    assert watch.changed() is None and watch.current == first
    write_atomically(paths.key, renewed.key.read_bytes())
    material = watch.changed()
    assert material is not None and material[0] == renewed.cert.read_bytes() and watch.current == material
    assert watch.changed() is None and watch.reloads == 1


def test_tls_options_must_come_in_pairs(ca):
    paths = ca.server_cert()
    with pytest.raises(ConfigError, match="ops.tls_cert_file and ops.tls_key_file go together"):
        validate_config(OpsConfig, {"tls_cert_file": str(paths.cert)})
    base = {"model": "m"}
    with pytest.raises(ConfigError, match="grpc.tls_cert_file and grpc.tls_key_file go together"):
        validate_config(TeacherConfig, {**base, "grpc": {"tls_key_file": str(paths.key)}})
    with pytest.raises(ConfigError, match="tls_client_ca_file needs grpc.tls_cert_file"):
        validate_config(TeacherConfig, {**base, "grpc": {"tls_client_ca_file": str(ca.ca_file)}})
    with pytest.raises(ConfigError, match="auth.cert_clients .* set grpc.tls_client_ca_file"):
        validate_config(TeacherConfig, {**base, "auth": {"cert_clients": {"cn": "alice"}}})
    tls = {"tls_cert_file": str(paths.cert), "tls_key_file": str(paths.key), "tls_client_ca_file": str(ca.ca_file)}
    with pytest.raises(ConfigError, match="client name 'bad name'"):
        validate_config(TeacherConfig, {**base, "grpc": tls, "auth": {"cert_clients": {"cn": "bad name"}}})
    config = validate_config(TeacherConfig, {**base, "grpc": tls, "auth": {"cert_clients": {"cn": "alice"}}})
    assert config.auth.enabled and config.grpc.cert_files().client_ca_file == str(ca.ca_file)


def test_client_tls_options_are_checked_before_connecting(ca, tmp_path):
    paths = ca.client_cert("alice")
    with pytest.raises(ConfigError, match="teacher.tls_cert_file and teacher.tls_key_file go together"):
        grpc_channel_credentials(str(ca.ca_file), str(paths.cert), None, option="teacher.tls")
    with pytest.raises(ConfigError, match="teacher.tls_ca_file .* cannot be read"):
        TeacherClient("127.0.0.1:1", tls_ca_file=str(tmp_path / "nope.pem"))
