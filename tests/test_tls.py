"""The broker's TLS contexts."""

from __future__ import annotations

import socket
import ssl
import threading

from broker.tls import server_context
from tests.pki import Pki, client_ssl_context


def test_serving_context_requires_a_client_certificate_and_mints_no_tickets(pki: Pki) -> None:
    ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.num_tickets == 0


def test_no_session_to_resume_after_a_full_handshake(pki: Pki) -> None:
    """Every connection proves its client certificate again: nothing to resume from."""
    server_ctx = server_context(pki.server.cert, pki.server.key, pki.bundle)
    client_ctx = client_ssl_context(pki, pki.client())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

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
            assert tls.session is None or not tls.session.has_ticket
    finally:
        thread.join(5)
        listener.close()
