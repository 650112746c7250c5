"""TLS material for every server and client of opd: loading PEM files, and reloading them when they change.

Owns: validating certificate / key / CA files at start-up with errors that
name the option to fix; noticing that a file changed (its stat, checked on
each new TLS handshake, so a renewed certificate or a rotated Kubernetes
Secret takes effect without a restart); gRPC server credentials that reload
(`grpc.dynamic_ssl_server_credentials`); gRPC channel credentials for
clients; and an `ssl.SSLContext` for the HTTP ops port (uvicorn) that swaps
in the renewed certificate on the next handshake.

A renewal that is half written (certificate and key do not match yet) is
logged and skipped: the previous certificate keeps serving until the files
change again. Does not decide who may call what (`opd.auth`, `teacher_server.auth`).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from pydantic import Field, model_validator

from opd.config import ConfigError, ConfigModel

log = logging.getLogger(__name__)

ALL_INTERFACES = frozenset({"0.0.0.0", "::", "", "[::]", "*"})


def listens_on_all_interfaces(host: str) -> bool:
    return host.strip() in ALL_INTERFACES


def check_cert_options(cert_file: str | None, key_file: str | None, where: str) -> None:
    """Both of `{where}.tls_cert_file` and `{where}.tls_key_file`, or neither (ValueError naming them)."""
    if bool(cert_file) != bool(key_file):
        raise ValueError(
            f"{where}.tls_cert_file and {where}.tls_key_file go together: give both to serve TLS, or neither"
        )


class TeacherTLSOptions(ConfigModel):
    """How a client (the trainer, `opd eval`) reaches a teacher over TLS: the fields every teacher config shares."""

    tls: bool = Field(default=False, description="connect over TLS, trusting the system's CAs (implied by tls_ca_file)")
    tls_ca_file: str | None = Field(
        default=None, description="TLS: PEM CA bundle that issued the teacher's certificate"
    )
    tls_cert_file: str | None = Field(
        default=None, description="mutual TLS: PEM client certificate presented to the teacher"
    )
    tls_key_file: str | None = Field(default=None, description="mutual TLS: PEM private key of tls_cert_file")
    tls_server_name: str | None = Field(
        default=None, description="TLS: name to check in the teacher's certificate (default: the address's host)"
    )

    @model_validator(mode="after")
    def _check_tls(self) -> TeacherTLSOptions:
        check_cert_options(self.tls_cert_file, self.tls_key_file, "teacher")
        return self


def _read(path: str, option: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{option} {path!r} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{option} {path!r} is not a PEM file (no -----BEGIN line)")
    return data


def _check_pair(cert_file: str, key_file: str, option: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{option}: the certificate {cert_file!r} and the key {key_file!r} cannot be used together ({exc}); "
            f"give the key that belongs to the certificate, both as PEM"
        ) from None


def _check_ca(ca_pem: bytes, ca_file: str, option: str) -> None:
    try:
        ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{option} {ca_file!r} holds no usable CA certificate ({exc})") from None


@dataclass(frozen=True)
class CertFiles:
    """A certificate and key (and, for mutual TLS, the CA that client certificates must chain to).

    `option` is the config prefix used in error messages (e.g. `grpc`, `ops`).
    """

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    option: str = "tls"

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)

    def load(self) -> tuple[bytes, bytes, bytes | None]:
        """(cert chain PEM, key PEM, client CA PEM or None), checked; ConfigError naming the option."""
        cert = _read(self.cert_file, f"{self.option}.tls_cert_file")
        key = _read(self.key_file, f"{self.option}.tls_key_file")
        _check_pair(self.cert_file, self.key_file, f"{self.option}.tls_cert_file/tls_key_file")
        ca = None
        if self.client_ca_file:
            ca = _read(self.client_ca_file, f"{self.option}.tls_client_ca_file")
            _check_ca(ca, self.client_ca_file, f"{self.option}.tls_client_ca_file")
        return cert, key, ca


def _stamps(paths: Sequence[str]) -> tuple[tuple[int, int, int] | None, ...]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)  # follows symlinks (Kubernetes Secret volumes swap a symlink)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


class CertWatch:
    """Loads `files` once (errors are ConfigError), then `changed()` returns new material when the files change.

    Thread-safe: gRPC calls its fetcher from its own threads.
    """

    def __init__(self, files: CertFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = _stamps(files.paths())
        self.current = files.load()
        self.reloads = 0

    def changed(self) -> tuple[bytes, bytes, bytes | None] | None:
        """New (cert, key, ca) if the files changed and load cleanly; None otherwise (keep serving the old)."""
        with self._lock:
            stamp = _stamps(self.files.paths())
            if stamp == self._stamp:
                return None
            try:
                material = self.files.load()
            except ConfigError as exc:
                # Remember the stamp so a half-written pair is reported once; the next write changes it again.
                self._stamp = stamp
                log.warning("TLS files changed but cannot be used yet (%s); still serving the previous ones", exc)
                return None
            if _stamps(self.files.paths()) != stamp:  # changed while being read: take it on the next handshake
                return None
            self._stamp, self.current = stamp, material
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.files.cert_file)
            return material


def grpc_server_credentials(files: CertFiles) -> grpc.ServerCredentials:
    """Server credentials that re-read the files when they change; client certificates are required
    (mutual TLS) when `files.client_ca_file` is set."""
    watch = CertWatch(files)

    def configuration(material: tuple[bytes, bytes, bytes | None]) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:  # called by gRPC before each handshake
        material = watch.changed()
        return configuration(material) if material is not None else None

    return grpc.dynamic_ssl_server_credentials(
        configuration(watch.current),
        # grpc's stub says the fetcher returns a configuration; gRPC documents None as "keep the current one"
        fetch,  # pyright: ignore[reportArgumentType]
        require_client_authentication=files.client_ca_file is not None,
    )


def grpc_channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None, option: str = "tls"
) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca_file` (default: the system's CAs); present cert/key for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"{option}_cert_file and {option}_key_file go together: give both for mutual TLS, or neither")
    ca = None
    if ca_file:
        ca = _read(ca_file, f"{option}_ca_file")
        _check_ca(ca, ca_file, f"{option}_ca_file")
    cert = key = None
    if cert_file and key_file:
        cert, key = _read(cert_file, f"{option}_cert_file"), _read(key_file, f"{option}_key_file")
        _check_pair(cert_file, key_file, f"{option}_cert_file/{option}_key_file")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class ReloadingSSLContext:
    """A server `ssl.SSLContext` for uvicorn whose certificate is re-read when its files change.

    The listening socket keeps `self.context`; on each handshake (`sni_callback`, called for every
    ClientHello, with or without SNI) the connection is switched to the newest context.
    """

    def __init__(self, files: CertFiles) -> None:
        self._watch = CertWatch(files)
        self.context = self._make()
        self.context.sni_callback = self._on_hello
        self._newest = self.context

    def _make(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._watch.files.cert_file, self._watch.files.key_file)
        return ctx

    def _on_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext) -> None:
        if self._watch.changed() is not None:
            try:
                self._newest = self._make()
            except (ssl.SSLError, OSError) as exc:  # replaced again between the check and the load
                log.warning("TLS certificate reload failed (%s); still serving the previous one", exc)
        if self._newest is not self.context:
            conn.context = self._newest
