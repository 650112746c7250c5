"""`opd certs`: a private CA and the teacher's and the students' certificates, for clusters without cert-manager.

Owns: making (or reusing) a CA, signing a teacher serving certificate for the names clients dial (the headless
Service's DNS names) and one client certificate per student (subject CN = the student's name, also a SAN, so that
the teacher's `auth.cert_clients` can map it), and writing them as PEM files laid out the way the Kubernetes
Secrets of deploy/k8s expect (`tls.crt`, `tls.key`, `ca.crt`).

Run it once before `kubectl apply -k` (docs/deploy.md); run it again with the same `--out` to add a student or
renew: the CA found there is reused, so certificates issued before stay valid. Does not talk to Kubernetes and
does not serve TLS (opd.tls loads and reloads what this writes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TEACHER_NAMES = ("opd-teacher-headless", "opd-teacher-headless.opd-teacher.svc", "localhost")
# A client name becomes a file name and a certificate CN: the characters a Kubernetes object name allows.
CLIENT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")


class CertsError(ValueError):
    """A bad option or an unusable existing CA; the message names what to change."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min of clock skew between nodes


def make_ca(days: int, name: str = "opd CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    names: Sequence[str],
    *,
    server: bool,
    days: int,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by `ca`: serverAuth for the teacher (`server`), clientAuth for a student."""
    ca_cert, ca_key = ca
    key = _key()
    start, end = _validity(days)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)  # a reader (the teacher's reload) never sees half a file


def load_or_make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `out/ca/` if both files are there, else a new one written there."""
    cert_path, key_path = out / "ca" / "tls.crt", out / "ca" / "tls.key"
    if cert_path.exists() != key_path.exists():
        missing = key_path if cert_path.exists() else cert_path
        raise CertsError(f"{missing} is missing beside its pair: restore it, or remove {out / 'ca'} to make a new CA")
    if cert_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except ValueError as exc:
            raise CertsError(f"the CA in {out / 'ca'} cannot be loaded ({exc}); remove it to make a new CA") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise CertsError(f"{key_path} is not the key of {cert_path}; remove {out / 'ca'} to make a new CA")
        return cert, key
    cert, key = make_ca(days)
    _write(cert_path, _cert_pem(cert))
    _write(key_path, _key_pem(key), private=True)
    return cert, key


def _write_leaf(directory: Path, ca_cert: x509.Certificate, leaf: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]):
    cert, key = leaf
    _write(directory / "tls.crt", _cert_pem(cert))
    _write(directory / "tls.key", _key_pem(key), private=True)
    _write(directory / "ca.crt", _cert_pem(ca_cert))


def make_all(out: Path, teacher_names: Sequence[str], clients: Sequence[str], days: int) -> list[Path]:
    """Write `out/ca/`, `out/teacher/` and `out/clients/<name>/` (tls.crt, tls.key, ca.crt); the directories."""
    bad = [c for c in clients if not CLIENT_NAME.match(c)]
    if bad:
        raise CertsError(f"--client {bad[0]!r}: use a Kubernetes-style name (lower case, digits, '-', '.')")
    if not teacher_names:
        raise CertsError("--teacher-name: give at least one name that clients dial the teacher by")
    ca = load_or_make_ca(out, days)
    written = [out / "ca", out / "teacher"]
    _write_leaf(out / "teacher", ca[0], issue(ca, teacher_names[0], teacher_names, server=True, days=days))
    for client in clients:
        _write_leaf(out / "clients" / client, ca[0], issue(ca, client, [client], server=False, days=days))
        written.append(out / "clients" / client)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opd certs",
        description="Make a CA (or reuse the one in --out), the teacher's serving certificate and one client "
        "certificate per student, as PEM files for Kubernetes Secrets (docs/deploy.md).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write ca/, teacher/, clients/<name>/")
    parser.add_argument(
        "--teacher-name",
        action="append",
        default=None,
        help="a DNS name or IP the clients dial the teacher by (repeatable; the first is the subject CN; "
        f"default: {', '.join(DEFAULT_TEACHER_NAMES)})",
    )
    parser.add_argument("--client", action="append", default=[], help="a student's client name (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="validity of every certificate written, in days")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.days < 1:
        print("opd certs: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        written = make_all(args.out, args.teacher_name or list(DEFAULT_TEACHER_NAMES), args.client, args.days)
    except CertsError as exc:
        print(f"opd certs: {exc}", file=sys.stderr)
        return 2
    for directory in written:
        print(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
