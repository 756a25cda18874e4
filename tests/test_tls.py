"""TLS, mutual TLS and the bind rules, against real ``memctl serve`` processes.

Proves that:

* a daemon with ``tls.cert``/``tls.key`` serves TLS clients (the Python client and
  the CLI) byte-identically, and refuses plaintext clients;
* with ``tls.client-ca`` it serves only clients presenting a certificate signed by
  that CA: none, or one from another CA, is refused at the handshake;
* a non-loopback address needs TLS, or ``--insecure`` (warned about in the log);
  ``auth: none`` is refused there whatever else is set; a refused start is one
  line on stderr, exit 1, and the daemon never listens;
* an incomplete TLS configuration (``tls.client-ca`` alone, ``tls.cert`` without
  ``tls.key``, and the reverse) refuses to start with one clear line.

The certificates are made here with ``cryptography``: one trusted CA signing the
daemon's certificate and a client certificate, and an unrelated CA signing a
client certificate the daemon must not accept.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from memctl import Client
from memctl.errors import ServiceUnavailable
from tests.conftest import Daemon, run_memctl, wait_until

#: Long enough for a loaded CI machine, short enough that a hung refusal fails fast.
REFUSED_TIMEOUT = 5.0
CALL_TIMEOUT = 30.0
SERVE_TIMEOUT = 60.0
VALUE = bytes(range(256)) * 1000 + b"\x00tail\xff"

Spawn = Callable[..., Daemon]


# --- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    """A certificate and its unencrypted key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Everything the tests need: a trusted CA and what it signed, and an
    untrusted CA with a client certificate of its own."""

    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    untrusted_client: Issued


@dataclass(frozen=True)
class _Signer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key")
    issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    issued.key.chmod(0o600)
    return issued


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(directory: Path, stem: str, common_name: str) -> tuple[Issued, _Signer]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(common_name, name, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, stem, cert, key), _Signer(name, key)


def _make_leaf(
    directory: Path,
    stem: str,
    signer: _Signer,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName] | None = None,
) -> Issued:
    key = _new_key()
    builder = (
        _builder(stem, signer.name, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(directory, stem, builder.sign(signer.key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A trusted CA with a server and a client certificate; an untrusted CA with a
    client certificate. PEM files, keys unencrypted."""
    directory = tmp_path_factory.mktemp("pki")
    ca, signer = _make_ca(directory, "ca", "memctl test CA")
    other_ca, other_signer = _make_ca(directory, "other-ca", "some other CA")
    server = _make_leaf(
        directory,
        "server",
        signer,
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _make_leaf(directory, "client", signer, ExtendedKeyUsageOID.CLIENT_AUTH)
    untrusted = _make_leaf(
        directory, "untrusted-client", other_signer, ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(ca, server, client, other_ca, untrusted)


@pytest.fixture(autouse=True)
def _no_memctl_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MEMCTL_TLS_*, MEMCTL_TOKEN... from the caller's shell would change what the
    clients (and the CLI, which inherits os.environ) do."""
    for name in list(os.environ):
        if name.startswith("MEMCTL_"):
            monkeypatch.delenv(name)


# --- helpers --------------------------------------------------------------------------


def tls_args(pki: Pki, *, client_ca: bool = False) -> list[str]:
    """``memctl serve`` arguments turning TLS on (mutual with ``client_ca``)."""
    args = ["--set", f"tls.cert={pki.server.cert}", "--set", f"tls.key={pki.server.key}"]
    if client_ca:
        args += ["--set", f"tls.client-ca={pki.ca.cert}"]
    return args


def port(address: str) -> str:
    return address.rsplit(":", 1)[-1]


def assert_round_trip(client: Client, daemon: Daemon, key: str) -> None:
    """The client reaches this very daemon and a value survives the trip unchanged."""
    assert client.status().pid == daemon.pid
    client.put(key, VALUE)
    assert client.get(key) == VALUE


def assert_refused(client: Client) -> None:
    """The connection fails at once (not the token, not a deadline): UNAVAILABLE."""
    with pytest.raises(ServiceUnavailable) as refused:
        client.status()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
    with pytest.raises(ServiceUnavailable):
        client.put("refused", b"should not be stored")


def wait_for_log(daemon: Daemon, text: str) -> None:
    """The daemon's gRPC core logs why it failed a handshake (on its own thread)."""
    wait_until(lambda: text in daemon.log(), timeout=10)


def refused_serve(tmp_path: Path, address: str, *args: str) -> str:
    """Run a ``memctl serve`` that must refuse to start; its one stderr line."""
    result = run_memctl(
        "serve",
        "--address",
        address,
        "--local-directory",
        str(tmp_path / "l"),
        *args,
        timeout=SERVE_TIMEOUT,
    )
    return one_line_failure(result)


def one_line_failure(result: subprocess.CompletedProcess[bytes]) -> str:
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 1, (result.returncode, stdout, stderr)
    # It never said it serves: it never listened, and it has exited (run returned).
    assert "memctl serving on" not in stdout, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("memctl serve: "), lines[0]
    return lines[0]


# --- TLS ------------------------------------------------------------------------------


def test_tls_client_and_cli_round_trip(spawn: Spawn, pki: Pki) -> None:
    daemon = spawn(*tls_args(pki), address="127.0.0.1:0")
    assert daemon.address.startswith("127.0.0.1:") and port(daemon.address) != "0"
    with Client(daemon.address, tls_ca=pki.ca.cert, timeout=CALL_TIMEOUT) as client:
        assert_round_trip(client, daemon, "over-tls")
    result = run_memctl(
        "get", "over-tls", "--address", daemon.address, "--tls-ca", str(pki.ca.cert), timeout=60
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == VALUE
    assert "without TLS" not in daemon.log()


def test_tls_daemon_refuses_plaintext(spawn: Spawn, pki: Pki) -> None:
    daemon = spawn(*tls_args(pki), address="127.0.0.1:0")
    with Client(daemon.address, timeout=REFUSED_TIMEOUT) as plain:
        assert_refused(plain)
    result = run_memctl("get", "refused", "--address", daemon.address, timeout=60)
    assert result.returncode != 0
    assert result.stdout == b""
    # Still serving TLS clients, and nothing was stored by the plaintext attempts.
    with Client(daemon.address, tls_ca=pki.ca.cert, timeout=CALL_TIMEOUT) as client:
        with pytest.raises(KeyError):
            client.get("refused")
        assert_round_trip(client, daemon, "after-plaintext")


def test_tls_client_refuses_a_daemon_it_does_not_trust(spawn: Spawn, pki: Pki) -> None:
    """The client checks the daemon too: trusting another CA, the handshake fails."""
    daemon = spawn(*tls_args(pki), address="127.0.0.1:0")
    with Client(daemon.address, tls_ca=pki.other_ca.cert, timeout=REFUSED_TIMEOUT) as client:
        assert_refused(client)


# --- mutual TLS -----------------------------------------------------------------------


def test_mutual_tls_needs_a_client_certificate_from_the_ca(spawn: Spawn, pki: Pki) -> None:
    daemon = spawn(*tls_args(pki, client_ca=True), address="127.0.0.1:0")
    address = daemon.address
    with Client(address, tls_ca=pki.ca.cert, timeout=REFUSED_TIMEOUT) as no_cert:
        assert_refused(no_cert)
    wait_for_log(daemon, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    untrusted = pki.untrusted_client
    with Client(
        address,
        tls_ca=pki.ca.cert,
        tls_cert=untrusted.cert,
        tls_key=untrusted.key,
        timeout=REFUSED_TIMEOUT,
    ) as wrong_ca:
        assert_refused(wrong_ca)
    wait_for_log(daemon, "CERTIFICATE_VERIFY_FAILED")
    with Client(address, timeout=REFUSED_TIMEOUT) as plain:
        assert_refused(plain)
    with Client(
        address,
        tls_ca=pki.ca.cert,
        tls_cert=pki.client.cert,
        tls_key=pki.client.key,
        timeout=CALL_TIMEOUT,
    ) as good:
        with pytest.raises(KeyError):
            good.get("refused")  # none of the refused puts got through
        assert_round_trip(good, daemon, "mutual")
    result = run_memctl(
        "get",
        "mutual",
        "--address",
        address,
        "--tls-ca",
        str(pki.ca.cert),
        "--tls-cert",
        str(pki.client.cert),
        "--tls-key",
        str(pki.client.key),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == VALUE


# --- bind rules -----------------------------------------------------------------------


def test_any_address_without_tls_is_refused(tmp_path: Path) -> None:
    line = refused_serve(tmp_path, "0.0.0.0:0")
    assert line.startswith("memctl serve: refusing to listen on 0.0.0.0:"), line
    assert "without TLS" in line
    assert "--insecure" in line
    assert "tls.cert" in line and "tls.key" in line


def test_any_address_with_insecure_warns_and_serves(spawn: Spawn) -> None:
    daemon = spawn("--insecure", address="0.0.0.0:0")
    assert daemon.address.startswith("0.0.0.0:") and port(daemon.address) != "0"
    warnings = [
        line for line in daemon.log().splitlines() if "WARNING" in line and "without TLS" in line
    ]
    assert len(warnings) == 1, daemon.log()
    assert "Listening on 0.0.0.0:" in warnings[0], warnings[0]
    # The token file is found by port: no token given, yet authenticated.
    with Client(f"127.0.0.1:{port(daemon.address)}", timeout=CALL_TIMEOUT) as client:
        assert_round_trip(client, daemon, "insecure")


def test_any_address_with_insecure_config_key_warns(spawn: Spawn) -> None:
    daemon = spawn("--set", "insecure=true", address="0.0.0.0:0")
    assert "without TLS" in daemon.log()
    with Client(f"127.0.0.1:{port(daemon.address)}", timeout=CALL_TIMEOUT) as client:
        assert_round_trip(client, daemon, "insecure-key")


def test_any_address_with_tls_serves_without_warning(spawn: Spawn, pki: Pki) -> None:
    daemon = spawn(*tls_args(pki), address="0.0.0.0:0")
    assert daemon.address.startswith("0.0.0.0:") and port(daemon.address) != "0"
    assert "without TLS" not in daemon.log()
    assert "WARNING" not in daemon.log()
    loopback = f"127.0.0.1:{port(daemon.address)}"
    with Client(loopback, tls_ca=pki.ca.cert, timeout=CALL_TIMEOUT) as client:
        assert_round_trip(client, daemon, "tls-any")
    with Client(loopback, timeout=REFUSED_TIMEOUT) as plain:
        assert_refused(plain)


@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_auth_none_on_any_address_is_refused(tmp_path: Path, pki: Pki, transport: str) -> None:
    extra = ["--insecure"] if transport == "insecure" else tls_args(pki)
    line = refused_serve(tmp_path, "0.0.0.0:0", "--auth", "none", *extra)
    assert line.startswith("memctl serve: refusing to listen on 0.0.0.0:"), line
    assert "auth: none" in line


# --- incomplete TLS configuration -----------------------------------------------------


def test_client_ca_without_cert_and_key_is_refused(tmp_path: Path, pki: Pki) -> None:
    line = refused_serve(tmp_path, "127.0.0.1:0", "--set", f"tls.client-ca={pki.ca.cert}")
    assert "tls.client-ca" in line
    assert "tls.cert" in line and "tls.key" in line


@pytest.mark.parametrize("present", ["cert", "key"])
def test_half_a_tls_pair_is_refused(tmp_path: Path, pki: Pki, present: str) -> None:
    path = pki.server.cert if present == "cert" else pki.server.key
    line = refused_serve(tmp_path, "127.0.0.1:0", "--set", f"tls.{present}={path}")
    assert "tls.cert" in line and "tls.key" in line
    assert "missing" in line


def test_half_a_tls_pair_on_any_address_is_refused(tmp_path: Path, pki: Pki) -> None:
    """tls.cert alone must not pass as TLS on a non-loopback address."""
    line = refused_serve(tmp_path, "0.0.0.0:0", "--set", f"tls.cert={pki.server.cert}")
    assert "tls.key" in line


def test_unreadable_tls_file_is_refused(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "no-such.key"
    line = refused_serve(
        tmp_path,
        "127.0.0.1:0",
        "--set",
        f"tls.cert={pki.server.cert}",
        "--set",
        f"tls.key={missing}",
    )
    assert "tls.key" in line and str(missing) in line


@pytest.mark.parametrize("broken", ["tls.cert", "tls.key", "tls.client-ca"])
def test_unusable_tls_files_are_refused_clearly(tmp_path: Path, pki: Pki, broken: str) -> None:
    """A file that is there but unusable (not PEM, or a key that is not the
    certificate's) must be named as the problem, not reported as an address in use."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    files = {
        "tls.cert": pki.server.cert,
        "tls.key": pki.server.key,
        "tls.client-ca": pki.ca.cert,
    }
    # A garbage certificate or CA file; a valid key of another certificate.
    files[broken] = pki.client.key if broken == "tls.key" else garbage
    result = run_memctl(
        "serve",
        "--address",
        "127.0.0.1:0",
        "--local-directory",
        str(tmp_path / "l"),
        *(arg for key, path in files.items() for arg in ("--set", f"{key}={path}")),
        timeout=SERVE_TIMEOUT,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "memctl serving on" not in result.stdout.decode()
    ours = [line for line in stderr.splitlines() if line.startswith("memctl serve: ")]
    assert len(ours) == 1, stderr
    assert broken in ours[0], ours[0]
    assert "in use" not in ours[0], ours[0]
    assert len(stderr.strip().splitlines()) == 1, stderr
