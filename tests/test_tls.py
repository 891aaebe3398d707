"""The broker's TLS contexts."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.identity import session_cache, tls
from broker.identity.ca import init_ca, issue_certificate, load_ca, write_issued
from broker.identity.tls import server_context
from tests.pki import SERVER_DNS, SERVER_ID, Pki, client_ssl_context


def test_serving_context_requires_a_client_certificate_and_mints_one_ticket(pki: Pki) -> None:
    ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.num_tickets == 1 and ctx.options & ssl.OP_NO_TICKET  # stateful tickets
    off = server_context(pki.server.cert, pki.server.key, pki.bundle, resumption=False)
    assert off.num_tickets == 0 and off.options & ssl.OP_NO_TICKET


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *, clean_close: bool = False
) -> ssl.SSLSession | None:
    """One mutual-TLS handshake over loopback and a byte each way; the client's session.
    `clean_close`: the server sends close_notify (OpenSSL drops a session from its cache
    when a connection ends without one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)
            if clean_close:
                with contextlib.suppress(OSError):
                    tls.unwrap()

    thread = threading.Thread(target=serve_one)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), 5) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.version() == "TLSv1.3"
            tls.sendall(b"x")  # the server's tickets, if any, arrive before its close
            tls.settimeout(5)
            tls.recv(1)
            return tls.session
    finally:
        thread.join(5)
        listener.close()


def test_a_ticket_to_resume_only_with_resumption_on(pki: Pki) -> None:
    """tls_resumption (default on) sends a TLS 1.3 ticket; off, nothing to resume from
    (tests/test_tls_resumption.py: resumed callers are identified correctly)."""
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    session = handshake(server_ctx, client_ssl_context(pki, pki.client()))
    assert session is not None and session.has_ticket
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle, resumption=False)
    session = handshake(server_ctx, client_ssl_context(pki, pki.client()))
    assert session is None or not session.has_ticket


def test_the_server_session_cache_is_bounded(pki: Pki) -> None:
    """OpenSSL keeps one session per full handshake (client certificate included, ~12 KB)
    for 2 hours and up to 20,480 per context; the broker bounds it (issue 19.3)."""
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    assert session_cache.bound_session_cache(server_ctx) is True
    assert session_cache.bound_session_cache(server_ctx, 3) is True
    client_ctx = client_ssl_context(pki, pki.client())
    for _ in range(10):
        handshake(server_ctx, client_ctx, clean_close=True)
    stats = server_ctx.session_stats()
    assert stats["accept_good"] == 10
    # Full: the oldest were dropped to make room (a session whose connection ended without
    # close_notify leaves the cache at once, so not all ten were kept in the first place).
    assert stats["number"] <= 3 and stats["cache_full"] >= 1, stats


def pem_certs(data: bytes | None) -> list[x509.Certificate]:
    assert data is not None
    return x509.load_pem_x509_certificates(data)


def test_a_leaf_alone_is_served_with_its_issuer_from_the_bundle(pki: Pki) -> None:
    """What OpenSSL would look up per handshake is found once: the leaf, then the root."""
    chain = pem_certs(tls._with_issuers(pki.server.cert, pki.bundle))
    assert chain == [x509.load_pem_x509_certificate(pki.server.cert.read_bytes()), pki.ca_cert]


def test_intermediates_are_followed_up_to_the_root(pki: Pki, tmp_path: Path) -> None:
    intermediate, intermediate_key = issue_certificate(
        pki.ca_cert, pki.ca_key, uri_sans=[f"spiffe://{pki.trust_domain}/intermediate"],
        is_ca=True, key_cert_sign=True,
    )  # fmt: skip
    leaf, key = issue_certificate(
        intermediate, intermediate_key, uri_sans=[SERVER_ID], dns=list(SERVER_DNS)
    )
    bundle = pki.bundle.read_bytes() + intermediate.public_bytes(Encoding.PEM)
    files = write_issued(leaf, key, tmp_path / "server", bundle)
    chain = pem_certs(tls._with_issuers(files.cert, files.bundle))
    # (The development root's pathLenConstraint is 0, so no verifier accepts this chain; the
    # lookup, like OpenSSL's own, only follows issuers.)
    assert chain == [leaf, intermediate, pki.ca_cert]


def test_nothing_is_added_to_a_file_that_has_a_chain_or_an_issuer_outside_the_bundle(
    pki: Pki, tmp_path: Path
) -> None:
    with_chain = tmp_path / "with-chain.pem"
    with_chain.write_bytes(pki.server.cert.read_bytes() + pki.bundle.read_bytes())
    assert tls._with_issuers(with_chain, pki.bundle) is None
    other = init_ca(tmp_path / "other-ca", pki.trust_domain)
    assert tls._with_issuers(pki.server.cert, other) is None


def test_a_bundle_certificate_with_the_issuers_name_but_not_its_key_is_not_the_issuer(
    pki: Pki, tmp_path: Path
) -> None:
    """Another CA of the same trust domain has the same subject: only the signature tells."""
    impostor = init_ca(tmp_path / "other-ca", pki.trust_domain)
    assert load_ca(tmp_path / "other-ca")[0].subject == pki.ca_cert.subject
    both = tmp_path / "both.pem"
    both.write_bytes(impostor.read_bytes() + pki.bundle.read_bytes())
    chain = pem_certs(tls._with_issuers(pki.server.cert, both))
    assert chain[1:] == [pki.ca_cert]


def test_without_a_writable_temp_dir_the_files_load_as_they_are(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only root file system costs the optimisation, never the listener."""

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tls.tempfile, "TemporaryDirectory", read_only)
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    handshake(server_ctx, client_ssl_context(pki, pki.client()))


def test_the_event_loops_call_the_c_methods_of_both_sides_tls_objects(pki: Pki) -> None:
    """The serving and the upstream contexts' objects have `read`, `write` and `pending`
    bound straight to the C object (no Python frame per record), with the signatures both
    event loops call: read(n), read(n, buffer), write(data), pending()."""
    client = pki.client()
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    client_ctx = tls.client_context(ca=pki.bundle)
    client_ctx.load_cert_chain(client.cert, client.key)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    upstream = client_ctx.wrap_bio(bios[2], bios[3], server_hostname=SERVER_DNS[0])
    for obj in (server, upstream):
        assert isinstance(obj, tls.DirectSSLObject)
        for name in ("read", "write", "pending"):
            assert type(getattr(obj, name)).__name__ == "builtin_function_or_method", name

    def pump() -> None:
        for _ in range(10):
            done = 0
            for obj in (upstream, server):
                try:
                    obj.do_handshake()
                    done += 1
                except ssl.SSLWantReadError:
                    pass
            bios[0].write(bios[3].read())
            bios[2].write(bios[1].read())
            if done == 2:
                return
        raise AssertionError("the handshake did not finish")

    pump()
    assert server.getpeercert(binary_form=True) == x509.load_pem_x509_certificate(
        client.cert.read_bytes()
    ).public_bytes(Encoding.DER)
    assert upstream.write(b"query") == 5
    bios[0].write(bios[3].read())
    buffer = bytearray(16)
    assert server.read(16, memoryview(buffer)) == 5 and buffer[:5] == b"query"
    assert server.pending() == 0
    with pytest.raises(ssl.SSLWantReadError):
        server.read(16)
    server.write(b"reply")
    bios[2].write(bios[1].read())
    assert upstream.read(3) == b"rep" and upstream.pending() == 2 and upstream.read(8) == b"ly"
