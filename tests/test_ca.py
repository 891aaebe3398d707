"""The development CA: its files work with real TLS stacks and meet the SVID rules."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import ConfigError
from broker.identity import IdentityError, identity_from_certificate, identity_from_der
from broker.identity.ca import (
    DEFAULT_LEAF_DAYS,
    IssuedFiles,
    init_ca,
    issue,
    issue_certificate,
    load_ca,
)
from tests.pki import (
    DEFAULT_CLIENT_ID,
    SERVER_ID,
    TRUST_DOMAIN,
    Pki,
    client_ssl_context,
    server_ssl_context,
)

# Bounds every network wait in these tests; a loopback handshake takes milliseconds.
IO_TIMEOUT = 10.0
# PostgreSQL's SSLRequest code (protocol 3, section "SSLRequest").
PG_SSL_REQUEST_CODE = 80877103


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files and extensions --------------------------------------------------------------------


def test_init_ca_writes_a_spiffe_root(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    bundle = init_ca(directory, TRUST_DOMAIN)

    assert bundle == directory / "bundle.pem"
    assert bundle.read_bytes() == (directory / "ca.pem").read_bytes()
    root = load(directory / "ca.pem")
    assert root.subject == root.issuer
    assert TRUST_DOMAIN in root.subject.rfc4514_string()
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.not_valid_after_utc - datetime.now(UTC) > timedelta(days=365)
    assert mode(directory / "ca-key.pem") == 0o600
    assert mode(directory) == 0o700
    cert, key = load_ca(directory)
    assert cert == root
    assert isinstance(key.curve, ec.SECP256R1)


def test_issue_writes_an_svid_with_the_requested_names(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TRUST_DOMAIN)
    files = issue(
        tmp_path / "ca",
        SERVER_ID,
        tmp_path / "certs" / "broker",
        dns=["localhost", "broker.internal"],
        ips=["127.0.0.1", "::1"],
    )

    assert files == IssuedFiles(
        cert=tmp_path / "certs" / "broker.pem",
        key=tmp_path / "certs" / "broker-key.pem",
        bundle=tmp_path / "certs" / "broker-bundle.pem",
    )
    assert files.bundle.read_bytes() == (tmp_path / "ca" / "bundle.pem").read_bytes()
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    # The cert file holds the leaf alone.
    assert files.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    leaf = load(files.cert)
    assert leaf.issuer == load(tmp_path / "ca" / "ca.pem").subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SERVER_ID]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "broker.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ip_address("127.0.0.1"),
        ip_address("::1"),
    ]
    assert leaf.subject.rfc4514_string() == "CN=localhost"
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_cert_sign
    assert not ku.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=DEFAULT_LEAF_DAYS) - timedelta(minutes=1) < lifetime
    assert lifetime <= timedelta(days=DEFAULT_LEAF_DAYS)


def test_client_svid_cn_is_the_spiffe_path_and_days_sets_lifetime(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TRUST_DOMAIN)
    files = issue(tmp_path / "ca", DEFAULT_CLIENT_ID, tmp_path / "orders", days=7)
    leaf = load(files.cert)
    assert leaf.subject.rfc4514_string() == "CN=ns/prod/sa/orders"
    lifetime = leaf.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=7) - timedelta(minutes=1) < lifetime <= timedelta(days=7)


def test_key_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_ca(tmp_path / "ca", TRUST_DOMAIN)
        # A key left world-readable by someone else is replaced, not reused.
        (tmp_path / "svc-key.pem").write_bytes(b"stale")
        (tmp_path / "svc-key.pem").chmod(0o644)
        files = issue(tmp_path / "ca", DEFAULT_CLIENT_ID, tmp_path / "svc.pem")
    finally:
        os.umask(old)
    assert files.cert == tmp_path / "svc.pem"  # a trailing .pem on the prefix is dropped
    assert mode(tmp_path / "ca" / "ca-key.pem") == 0o600
    assert mode(files.key) == 0o600
    assert files.key.read_bytes() != b"stale"
    assert mode(files.cert) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_reissue_rotates_the_key(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TRUST_DOMAIN)
    first = issue(tmp_path / "ca", DEFAULT_CLIENT_ID, tmp_path / "svc")
    key1 = first.key.read_bytes()
    second = issue(tmp_path / "ca", DEFAULT_CLIENT_ID, tmp_path / "svc")
    assert second == first
    assert second.key.read_bytes() != key1


# --- errors ----------------------------------------------------------------------------------


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    init_ca(tmp_path, TRUST_DOMAIN)
    key_before = (tmp_path / "ca-key.pem").read_bytes()
    with pytest.raises(ConfigError, match=r"already exists.*ca\.pem.*refusing to overwrite"):
        init_ca(tmp_path, "other.org")
    assert (tmp_path / "ca-key.pem").read_bytes() == key_before


@pytest.mark.parametrize(
    ("trust_domain", "message"),
    [
        ("", "cannot be empty"),
        ("exa mple.org", "bad trust domain"),
        ("Example.org", "lowercase, as 'example.org'"),
        ("spiffe://example.org/path", "bad trust domain"),
    ],
)
def test_init_rejects_bad_trust_domains(tmp_path: Path, trust_domain: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        init_ca(tmp_path / "ca", trust_domain)
    assert not (tmp_path / "ca").exists()


def test_init_accepts_a_trust_domain_written_as_a_spiffe_id(tmp_path: Path) -> None:
    init_ca(tmp_path, "spiffe://example.org")
    san = load(tmp_path / "ca.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no CA here.*sidekey ca init"):
        issue(tmp_path, DEFAULT_CLIENT_ID, tmp_path / "x")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spiffe_id": "https://example.org/x"}, "bad SPIFFE ID.*spiffe://"),
        ({"spiffe_id": "spiffe://example.org/a/../b"}, "bad SPIFFE ID"),
        ({"spiffe_id": "spiffe://example.org"}, "has no path"),
        ({"spiffe_id": "spiffe://evil.org/x"}, "outside this CA's trust domain 'example.org'"),
        ({"ips": ["127.0.0.300"]}, "bad IP address '127.0.0.300'"),
        ({"dns": ["bad name"]}, "bad DNS name 'bad name'"),
        ({"days": 0}, "days: must be at least 1"),
        ({"days": 365 * 20}, "would outlive the CA"),
    ],
)
def test_issue_rejects_bad_requests(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    init_ca(tmp_path / "ca", TRUST_DOMAIN)
    args: dict[str, object] = {"spiffe_id": DEFAULT_CLIENT_ID, **kwargs}
    with pytest.raises(ConfigError, match=message):
        issue(tmp_path / "ca", out_prefix=tmp_path / "out" / "x", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


# --- SPIFFE rules (broker.identity) ----------------------------------------------------------


def test_identity_accepts_an_issued_svid(pki: Pki) -> None:
    ident = identity_from_certificate(load(pki.client().cert), TRUST_DOMAIN)
    assert ident.spiffe_id == DEFAULT_CLIENT_ID
    assert ident.method == "x509-svid"
    assert identity_from_certificate(load(pki.server.cert), TRUST_DOMAIN).spiffe_id == SERVER_ID


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (Pki.two_uri_client, "multiple URI SAN"),
        (Pki.ca_flag_client, "CA flag"),
        (Pki.foreign_domain_client, "outside the trust domain 'example.org'"),
    ],
)
def test_identity_rejects_broken_svids(
    pki: Pki, make: Callable[[Pki], IssuedFiles], message: str
) -> None:
    with pytest.raises(IdentityError, match=message):
        identity_from_certificate(load(make(pki).cert), TRUST_DOMAIN)


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"uri_sans": []}, "does not contain a SubjectAlternativeName"),
        ({"key_cert_sign": True}, "keyCertSign"),
        ({"digital_signature": False}, "digitalSignature"),
        ({"basic_constraints": False}, "BasicConstraints"),
        ({"key_usage": False}, "KeyUsage"),
    ],
)
def test_low_level_switches_break_one_rule_each(
    pki: Pki, switches: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"uri_sans": [DEFAULT_CLIENT_ID], **switches}
    cert, _ = issue_certificate(pki.ca_cert, pki.ca_key, **args)  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match=message):
        identity_from_certificate(cert, TRUST_DOMAIN)


# --- openssl verify --------------------------------------------------------------------------


async def run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), IO_TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.parametrize(("which", "purpose"), [("server", "sslserver"), ("client", "sslclient")])
async def test_openssl_verifies_issued_certificates(pki: Pki, which: str, purpose: str) -> None:
    files = pki.server if which == "server" else pki.client()
    rc, out = await run(
        "openssl", "verify", "-x509_strict", "-purpose", purpose,
        "-CAfile", str(files.bundle), str(files.cert),
    )  # fmt: skip
    assert rc == 0, out
    assert out.strip().endswith(": OK")


@pytest.mark.parametrize(
    "make", [Pki.two_uri_client, Pki.ca_flag_client, Pki.foreign_domain_client]
)
async def test_broken_svids_still_chain_to_the_bundle(
    pki: Pki, make: Callable[[Pki], IssuedFiles]
) -> None:
    """TLS lets these through, so tests that use them exercise the identity layer itself."""
    files = make(pki)
    rc, out = await run(
        "openssl", "verify", "-x509_strict", "-purpose", "sslclient",
        "-CAfile", str(pki.bundle), str(files.cert),
    )  # fmt: skip
    assert rc == 0, out


async def test_openssl_rejects_a_certificate_from_another_ca(pki: Pki) -> None:
    files = pki.other_ca_client()
    rc, out = await run("openssl", "verify", "-CAfile", str(pki.bundle), str(files.cert))
    assert rc != 0
    assert "error" in out


# --- real handshakes -------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, ssl_ctx: ssl.SSLContext | None) -> AsyncIterator[int]:
    """Serve `handler` on an ephemeral 127.0.0.1 port; yield the port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def peer_spiffe_id(writer: asyncio.StreamWriter) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return identity_from_der(der, TRUST_DOMAIN).spiffe_id


async def echo_identity(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reply with the client's SPIFFE ID as a tiny HTTP/1.1 response."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        body = peer_spiffe_id(writer).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
    finally:
        writer.close()


async def https_get(pki: Pki, port: int, host: str, files: IssuedFiles | None) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl_context(pki, files), server_hostname=host
        ),
        IO_TIMEOUT,
    )
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return await asyncio.wait_for(reader.read(), IO_TIMEOUT)
    finally:
        writer.close()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_python_ssl_mutual_tls_handshake(pki: Pki, host: str) -> None:
    async with serve(echo_identity, server_ssl_context(pki)) as port:
        response = await https_get(pki, port, host, pki.client())
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert response.endswith(DEFAULT_CLIENT_ID.encode())


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("valid", None),  # the same harness does accept a trusted client
        ("none", "peer did not return a certificate"),
        ("other-ca", "certificate signature failure|unable to get local issuer"),
        ("expired", "certificate has expired"),
    ],
)
async def test_python_ssl_server_rejects_untrusted_clients(
    pki: Pki, which: str, reason: str | None
) -> None:
    files = {
        "valid": pki.client(),
        "none": None,
        "other-ca": pki.other_ca_client(),
        "expired": pki.expired_client(),
    }[which]
    outcome: list[str | BaseException] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # TLS started by hand so the server-side handshake error is ours to inspect.
        try:
            await writer.start_tls(server_ssl_context(pki))
            outcome.append(peer_spiffe_id(writer))
        except ssl.SSLError as exc:
            outcome.append(exc)
        finally:
            writer.close()

    async with serve(handler, None) as port:
        # TLS 1.3 completes the client's side before the server judges the client's
        # certificate, so the client sees the rejection as a closed stream or an alert.
        try:
            response = await https_get(pki, port, "localhost", files)
        except (ssl.SSLError, ConnectionResetError):
            response = b""
    assert response == b""
    if reason is None:
        assert outcome == [DEFAULT_CLIENT_ID]
        return
    assert len(outcome) == 1
    assert isinstance(outcome[0], ssl.SSLError)
    assert re.search(reason, str(outcome[0])), outcome[0]


async def test_client_rejects_a_server_outside_the_bundle(pki: Pki, tmp_path: Path) -> None:
    init_ca(tmp_path / "rogue", TRUST_DOMAIN)
    rogue = issue(tmp_path / "rogue", SERVER_ID, tmp_path / "srv", dns=["localhost"])
    ctx = server_ssl_context(pki, rogue)
    async with serve(echo_identity, ctx) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await https_get(pki, port, "localhost", pki.client())


async def test_client_checks_the_server_name(pki: Pki) -> None:
    async with serve(echo_identity, server_ssl_context(pki)) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            await https_get(pki, port, "broker.example.net", pki.client())


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_curl_mutual_tls_request(pki: Pki, host: str) -> None:
    client = pki.client()
    async with serve(echo_identity, server_ssl_context(pki)) as port:
        rc, out = await run(
            "curl", "--silent", "--show-error", "--max-time", str(IO_TIMEOUT),
            "--cacert", str(client.bundle), "--cert", str(client.cert), "--key", str(client.key),
            f"https://{host}:{port}/",
        )  # fmt: skip
    assert rc == 0, out
    assert out == DEFAULT_CLIENT_ID


async def test_curl_without_a_client_certificate_is_refused(pki: Pki) -> None:
    async with serve(echo_identity, server_ssl_context(pki)) as port:
        rc, out = await run(
            "curl", "--silent", "--show-error", "--max-time", str(IO_TIMEOUT),
            "--cacert", str(pki.bundle), f"https://localhost:{port}/",
        )  # fmt: skip
    assert rc != 0
    assert DEFAULT_CLIENT_ID not in out


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_libpq_verify_full_with_client_certificate(pki: Pki, host: str) -> None:
    """psql negotiates TLS after SSLRequest, verifies our server name and presents its SVID.

    The fake server answers the startup message with an error carrying the client's SPIFFE ID,
    which proves libpq loaded the key file (it refuses one readable by group/other).
    """

    async def postgres(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length, code = struct.unpack("!II", await reader.readexactly(8))
            assert (length, code) == (8, PG_SSL_REQUEST_CODE)
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(server_ssl_context(pki))
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            await reader.readexactly(length - 4)  # the startup message
            fields = b"SFATAL\0C28000\0Mhello %s\0\0" % peer_spiffe_id(writer).encode()
            writer.write(b"E" + struct.pack("!I", len(fields) + 4) + fields)
            await writer.drain()
        finally:
            writer.close()

    client = pki.client()
    async with serve(postgres, None) as port:
        dsn = (
            f"host={host} port={port} dbname=orders user=app connect_timeout=10 "
            f"sslmode=verify-full gssencmode=disable sslrootcert={client.bundle} "
            f"sslcert={client.cert} sslkey={client.key}"
        )
        rc, out = await run("psql", "--no-psqlrc", "--command=select 1", dsn)
    assert rc == 2, out
    assert f"FATAL:  hello {DEFAULT_CLIENT_ID}" in out
