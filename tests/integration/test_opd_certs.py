"""`opd certs`: the files it writes serve the teacher over mutual TLS, name the student, and a re-run keeps the CA."""

from __future__ import annotations

import stat

import httpx
import numpy as np
import pytest
from cryptography import x509

from opd.certs import main as certs_main
from opd.cli import main as opd_main
from teacher_server.client import TeacherClientError, TeacherClientSync
from tests.fixtures.teacher import start_teacher

pytestmark = pytest.mark.timeout(180)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _dns_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_layout_names_and_private_key_modes(tmp_path):
    out = tmp_path / "certs"
    assert opd_main(["certs", "--out", str(out), "--client", "student-a", "--client", "student-b"]) == 0
    ca = _cert(out / "ca" / "tls.crt")
    teacher = _cert(out / "teacher" / "tls.crt")
    assert "opd-teacher-headless" in _dns_names(teacher) and teacher.issuer == ca.subject
    for name in ("student-a", "student-b"):
        client = _cert(out / "clients" / name / "tls.crt")
        cn = client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == name and _dns_names(client) == [name] and client.issuer == ca.subject
        assert (out / "clients" / name / "ca.crt").read_bytes() == (out / "ca" / "tls.crt").read_bytes()
    for key in out.rglob("tls.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_a_second_run_reuses_the_ca_and_adds_a_student(tmp_path):
    out = tmp_path / "certs"
    assert certs_main(["--out", str(out), "--client", "student-a"]) == 0
    ca_before = (out / "ca" / "tls.crt").read_bytes()
    assert certs_main(["--out", str(out), "--client", "student-c"]) == 0
    assert (out / "ca" / "tls.crt").read_bytes() == ca_before
    assert (out / "clients" / "student-a" / "tls.crt").exists()  # earlier students are left as they were
    assert _cert(out / "clients" / "student-c" / "tls.crt").issuer == _cert(out / "ca" / "tls.crt").subject


def test_bad_input_is_refused_with_the_option_named(tmp_path, capsys):
    assert certs_main(["--out", str(tmp_path / "a"), "--client", "Student_A"]) == 2
    assert "--client 'Student_A'" in capsys.readouterr().err
    (tmp_path / "b" / "ca").mkdir(parents=True)
    (tmp_path / "b" / "ca" / "tls.crt").write_text("x")
    assert certs_main(["--out", str(tmp_path / "b")]) == 2
    assert "tls.key is missing" in capsys.readouterr().err
    assert certs_main(["--out", str(tmp_path / "c"), "--days", "0"]) == 2


def test_teacher_serves_mutual_tls_with_the_written_files(tiny_model_dir, tmp_path):
    out = tmp_path / "certs"
    assert certs_main(["--out", str(out), "--teacher-name", "localhost", "--client", "student-a"]) == 0
    teacher, client = out / "teacher", out / "clients" / "student-a"
    server = start_teacher(
        tiny_model_dir,
        "hf",
        grpc={
            "tls_cert_file": str(teacher / "tls.crt"),
            "tls_key_file": str(teacher / "tls.key"),
            "tls_client_ca_file": str(teacher / "ca.crt"),
        },
        auth={"cert_clients": {"student-a": "student-a"}},
    )
    try:
        tls = {"tls_ca_file": str(client / "ca.crt"), "tls_server_name": "localhost"}
        mine = {"tls_cert_file": str(client / "tls.crt"), "tls_key_file": str(client / "tls.key")}
        with TeacherClientSync(server.address, timeout_s=60, **tls, **mine) as c:
            assert np.isfinite(c.score(np.arange(1, 9), 3, top_k=2).token_logprobs).all()
        metrics = httpx.get(f"{server.ops_url}/metrics").text
        assert 'opd_teacher_requests_total{client="student-a",code="OK",rpc="ScoreStream"} 1.0' in metrics
        with pytest.raises(TeacherClientError), TeacherClientSync(server.address, timeout_s=2.0, **tls) as c:
            c.score(np.arange(1, 9), 3)  # no client certificate: refused by the handshake
    finally:
        server.stop()
