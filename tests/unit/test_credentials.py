"""``kafka.client`` security settings become the credentials Faust's Kafka transport (aiokafka) connects with.

``stream.app._credentials`` turns the librdkafka-style keys of the config into Faust credential objects, and
Faust's aiokafka driver turns those into aiokafka's connection settings. Both steps are checked here. The SSL
contexts are checked by use: a real TLS handshake on loopback against a server that trusts only a CA made
for this test (with the ``openssl`` command) and requires a client certificate signed by it.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import AuthProtocol, SASLMechanism

from stream.app import _credentials


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it alone must fail the handshake


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"openssl {' '.join(args)} failed:\n{out.stderr}"


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n" + ext
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make the test CA: apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "localhost", "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _make_leaf(d, "client", "writeguard", "extendedKeyUsage=clientAuth\n")
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key", d / "other-ca.crt")


@dataclass
class Handshake:
    client_cert: dict[str, Any] | None = None  # what the server saw of the client's certificate
    server_error: BaseException | None = None
    client_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.client_cert is not None


def handshake(pki: Pki, client_ctx: ssl.SSLContext, *, require_client_cert: bool = True) -> Handshake:
    """A TLS handshake and one read with ``client_ctx`` against a loopback server; what each side saw.

    The server presents a certificate for ``localhost`` signed by the test CA, and (by default) refuses a
    client without a certificate signed by the same CA.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server_ctx.load_verify_locations(pki.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    listener = socket.create_server(("127.0.0.1", 0))
    result = Handshake()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(30)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result.client_cert = dict(tls.getpeercert() or {})
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            result.server_error = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=30) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                got = tls.recv(2)
                if got != b"ok":
                    raise ConnectionError(f"the server closed the connection after the handshake ({got!r})")
    except (ssl.SSLError, OSError) as e:
        result.client_error = e
    finally:
        thread.join(30)
        listener.close()
    assert not thread.is_alive(), "the TLS server thread did not finish"
    return result


def common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def test_plaintext_gives_no_credentials() -> None:
    assert _credentials({}) is None
    assert _credentials({"security.protocol": "PLAINTEXT"}) is None
    assert _credentials({"security.protocol": "plaintext"}) is None
    assert credentials_to_aiokafka_auth(_credentials({})) == {"security_protocol": "PLAINTEXT"}


def test_ssl_carries_the_ca_and_the_client_certificate(pki: Pki) -> None:
    creds = _credentials(
        {
            "security.protocol": "SSL",
            "ssl.ca.location": str(pki.ca),
            "ssl.certificate.location": str(pki.client_cert),
            "ssl.key.location": str(pki.client_key),
        }
    )
    assert isinstance(creds, faust.SSLCredentials)
    assert creds.protocol is AuthProtocol.SSL
    ctx = creds.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [common_name(c) for c in ctx.get_ca_certs()] == ["ca"]  # the configured CA, not the system's
    # The server requires a client certificate from the test CA: the handshake shows the context holds it.
    seen = handshake(pki, ctx)
    assert seen.ok, seen
    assert seen.client_cert is not None and common_name(seen.client_cert) == "writeguard"
    auth = credentials_to_aiokafka_auth(creds)
    assert auth == {"security_protocol": "SSL", "ssl_context": ctx}


def test_ssl_context_trusts_only_the_configured_ca(pki: Pki) -> None:
    creds = _credentials({"security.protocol": "ssl", "ssl.ca.location": str(pki.other_ca)})
    assert isinstance(creds, faust.SSLCredentials)
    seen = handshake(pki, creds.context, require_client_cert=False)
    assert isinstance(seen.client_error, ssl.SSLCertVerificationError), seen


def test_ssl_without_a_client_certificate_is_refused_by_a_server_that_requires_one(pki: Pki) -> None:
    creds = _credentials({"security.protocol": "SSL", "ssl.ca.location": str(pki.ca)})
    assert isinstance(creds, faust.SSLCredentials)
    lenient = handshake(pki, creds.context, require_client_cert=False)
    assert lenient.ok and lenient.client_cert == {}, lenient  # the CA is trusted; no certificate was sent
    strict = handshake(pki, creds.context)
    assert isinstance(strict.server_error, ssl.SSLError) and strict.client_cert is None, strict
    assert strict.client_error is not None, strict


def test_sasl_plaintext_carries_username_password_and_mechanism() -> None:
    creds = _credentials(
        {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "writeguard",
            "sasl.password": "s3cret",
        }
    )
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("writeguard", "s3cret")
    assert creds.mechanism is SASLMechanism.SCRAM_SHA_256
    assert creds.protocol is AuthProtocol.SASL_PLAINTEXT and creds.ssl_context is None
    assert credentials_to_aiokafka_auth(creds) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "writeguard",
        "sasl_plain_password": "s3cret",
        "ssl_context": None,
    }


def test_sasl_mechanism_defaults_to_plain() -> None:
    creds = _credentials({"security.protocol": "sasl_plaintext", "sasl.username": "u", "sasl.password": "p"})
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism is SASLMechanism.PLAIN
    assert credentials_to_aiokafka_auth(creds)["sasl_mechanism"] == "PLAIN"


def test_sasl_ssl_carries_the_credentials_and_an_ssl_context_with_the_ca_and_client_certificate(pki: Pki) -> None:
    creds = _credentials(
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "writeguard",
            "sasl.password": "pa ss:word",
            "ssl.ca.location": str(pki.ca),
            "ssl.certificate.location": str(pki.client_cert),
            "ssl.key.location": str(pki.client_key),
        }
    )
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("writeguard", "pa ss:word")
    assert creds.mechanism is SASLMechanism.SCRAM_SHA_512
    assert creds.protocol is AuthProtocol.SASL_SSL
    ctx = creds.ssl_context
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [common_name(c) for c in ctx.get_ca_certs()] == ["ca"]
    seen = handshake(pki, ctx)
    assert seen.ok and seen.client_cert is not None and common_name(seen.client_cert) == "writeguard", seen
    assert credentials_to_aiokafka_auth(creds) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "writeguard",
        "sasl_plain_password": "pa ss:word",
        "ssl_context": ctx,
    }


def test_the_app_is_built_with_the_credentials_of_the_config(tmp_path: Path) -> None:
    """build_app hands ``_credentials(cfg.kafka.client)`` to Faust as ``broker_credentials``."""
    from stream.app import build_app
    from stream.config import make_engine, parse_config
    from stream.metrics import Metrics
    from testbed.stack import example_config

    data = example_config("127.0.0.1:9", "cred")
    data["kafka"]["client"] = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "writeguard",
        "sasl.password": "s3cret",
    }
    cfg = parse_config(data)
    app = build_app(cfg, make_engine(cfg), Metrics(), datadir=str(tmp_path / "faust"))
    creds = app.conf.broker_credentials
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, creds.mechanism) == ("writeguard", "s3cret", SASLMechanism.PLAIN)
    assert credentials_to_aiokafka_auth(creds, app.conf.ssl_context)["security_protocol"] == "SASL_PLAINTEXT"


def test_sasl_mechanisms_librdkafka_spelling_reaches_faust() -> None:
    """librdkafka's own key is `sasl.mechanisms`; the confluent-kafka clients honour it, so Faust must too."""
    creds = _credentials(
        {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": "u",
            "sasl.password": "p",
        }
    )
    assert isinstance(creds, faust.SASLCredentials)
    assert creds.mechanism is SASLMechanism.SCRAM_SHA_512


def test_an_encrypted_client_key_is_opened_with_ssl_key_password(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "client-encrypted.key"
    _openssl(
        "pkey", "-in", str(pki.client_key), "-aes256", "-passout", "pass:k3y-secret", "-out", str(encrypted),
        cwd=tmp_path,
    )  # fmt: skip
    settings = {
        "security.protocol": "SSL",
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(encrypted),
    }
    creds = _credentials({**settings, "ssl.key.password": "k3y-secret"})
    assert isinstance(creds, faust.SSLCredentials)
    seen = handshake(pki, creds.context)
    assert seen.ok and seen.client_cert is not None and common_name(seen.client_cert) == "writeguard", seen
    with pytest.raises(ssl.SSLError):
        _credentials({**settings, "ssl.key.password": "wrong"})
