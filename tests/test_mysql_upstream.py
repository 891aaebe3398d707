"""adapters.mysql._upstream against a scripted caching_sha2_password server.

A fake, and only because Debian 12 ships no MySQL 8 server (MariaDB does not implement
caching_sha2_password): the script below plays the server's side of that method as MySQL
8.0's sql/auth/sha2_password.cc does (fast path, full authentication over TLS, RSA key
exchange without TLS) and checks every answer the broker sends. The other methods are
tested against the real MariaDB in test_mysql_adapter.py.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from adapters.mysql._upstream import ConnectFailed, UpstreamRefused, login
from broker.codecs import mysql
from broker.codecs.mysql import constants as c
from broker.config import ListenAddress, Section
from broker.errors import UpstreamError
from broker.session import net
from broker.session.upstream import parse_target
from tests.loops import Run, server_context

PASSWORD = "s3cret-pässword"
SCRAMBLE = b"0123456789abcdefghij"
CAPS = (
    c.CLIENT_PROTOCOL_41 | c.CLIENT_SECURE_CONNECTION | c.CLIENT_PLUGIN_AUTH
    | c.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | c.CLIENT_CONNECT_WITH_DB | c.CLIENT_SSL
    | c.CLIENT_DEPRECATE_EOF | c.CLIENT_LONG_PASSWORD
)  # fmt: skip
CLIENT = mysql.HandshakeResponse41(CAPS & ~c.CLIENT_SSL, 1 << 24, 45, "app", b"", "appdb")
_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class Sha2Server:
    """Plays MySQL 8's caching_sha2_password; `cached` picks the fast path."""

    def __init__(self, ca: trustme.CA, *, cached: bool) -> None:
        self.ca = ca
        self.cached = cached
        self.saw: list[str] = []

    async def handle(self, conduit: net.Conduit) -> None:
        """Over the broker's own Conduit: a MySQL client's ClientHello follows its SSLRequest
        at once, which asyncio's streams cannot hand to TLS (Conduit's early_tls can)."""
        seq = 0
        buffer = b""

        async def read() -> bytes:
            nonlocal seq, buffer
            while len(buffer) < 4 or len(buffer) < 4 + mysql.header(buffer)[0]:
                buffer += await conduit.receive(10)
            length, seq = mysql.header(buffer)
            body, buffer = buffer[4 : 4 + length], buffer[4 + length :]
            return body

        def send(payload: bytes) -> None:
            nonlocal seq
            seq += 1
            conduit.write(mysql.frame(payload, seq))

        greeting = mysql.HandshakeV10("8.0.36", 9, SCRAMBLE, CAPS, 255, 2, "caching_sha2_password")
        conduit.write(mysql.encode(greeting, 0))
        first = mysql.decode_client_hello(await read())
        if isinstance(first, mysql.SSLRequest):
            self.saw.append("tls")
            conduit.unread(buffer)
            buffer = b""
            await conduit.start_tls(server_context(self.ca), server_side=True, early_tls=True)
            first = mysql.decode_client_hello(await read())
        assert isinstance(first, mysql.HandshakeResponse41)
        assert first.user == "app" and first.database == "appdb"
        assert first.auth_plugin == "caching_sha2_password"
        p1 = hashlib.sha256(PASSWORD.encode()).digest()
        stored = hashlib.sha256(p1).digest()
        expected = _xor(p1, hashlib.sha256(stored + SCRAMBLE).digest())
        assert first.auth_response == expected, "the fast-path scramble"
        if self.cached:
            self.saw.append("fast")
            send(b"\x01\x03")
        else:
            send(b"\x01\x04")
            answer = await read()
            if conduit.is_tls:
                assert answer == PASSWORD.encode() + b"\0"
                self.saw.append("full-tls")
            else:
                assert answer == b"\x02", "asks for the public key"
                pem = _KEY.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                send(b"\x01" + pem)
                encrypted = await read()
                plain = _KEY.decrypt(
                    encrypted,
                    padding.OAEP(
                        mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None
                    ),
                )
                stretched = (SCRAMBLE * 8)[: len(plain)]
                assert _xor(plain, stretched) == PASSWORD.encode() + b"\0"
                self.saw.append("full-rsa")
        send(mysql.payload(mysql.OkPacket(0, 0, 2, 0)))
        # Hold the connection until the broker's side is done with it.
        await conduit.receive(10)


def _target(port: int, mode: str, ca: trustme.CA, tmp: Any) -> Any:
    raw: dict[str, Any] = {"address": f"127.0.0.1:{port}", "tls": {"mode": mode}}
    if mode.startswith("verify"):
        path = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(path))
        raw["tls"]["ca"] = str(path)
    return parse_target(Section(raw, "upstream"), tmp, 3306)


CASES = {
    "fast-plain": (True, "disable", ["fast"]),
    "full-tls": (False, "verify-full", ["tls", "full-tls"]),
    "full-rsa": (False, "disable", ["full-rsa"]),
    "fast-tls": (True, "require", ["tls", "fast"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_caching_sha2_password(case: str, run: Run, ca: trustme.CA, tmp_path: Any) -> None:
    cached, mode, path = CASES[case]

    async def main() -> None:
        server = Sha2Server(ca, cached=cached)
        listener = await net.serve(ListenAddress("127.0.0.1", 0), server.handle, max_connections=2)
        assert listener.address.port is not None
        target = _target(listener.address.port, mode, ca, tmp_path)
        loop = asyncio.get_running_loop()
        try:
            auth = await login(target, CLIENT, "app", PASSWORD, "appdb", loop.time() + 20)
            auth.conduit.close()
        finally:
            await listener.close(drain_timeout=5)
        assert auth.greeting.server_version == "8.0.36"
        assert auth.conduit.is_tls is (mode != "disable")
        assert server.saw == path

    run(main())


def test_refusal_and_unreachable(run: Run, ca: trustme.CA, tmp_path: Any) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(mysql.frame(b"\xff\x10\x04Too many connections", 0))
        await writer.drain()
        writer.close()

    async def main() -> None:
        from tests.servers import free_port

        listener = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        async with listener:
            with pytest.raises(UpstreamRefused) as raised:
                await login(_target(port, "disable", ca, tmp_path), CLIENT, "app", "x", "appdb",
                            loop.time() + 10)  # fmt: skip
            assert raised.value.err.code == 1040
            # Plain text to a server that offers no TLS, with TLS required: refused.
            with pytest.raises(UpstreamError):
                await login(_target(port, "require", ca, tmp_path), CLIENT, "app", "x", "appdb",
                            loop.time() + 10)  # fmt: skip
        with pytest.raises(ConnectFailed):
            await login(_target(free_port(), "disable", ca, tmp_path), CLIENT, "app", "x",
                        "appdb", loop.time() + 10)  # fmt: skip

    run(main())
