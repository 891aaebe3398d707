"""Write the seed inputs of tests/fuzz/corpus/ (real protocol bytes for each target); the
fuzzer adds what it finds next to them. `python -m tests.fuzz.seed` rewrites only seeds."""

from __future__ import annotations

import struct
from pathlib import Path

from broker.codecs import mysql
from broker.codecs import postgres as pg
from broker.codecs.mysql import constants as my

CORPUS = Path(__file__).parent / "corpus"


def typed(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def seeds() -> dict[str, list[bytes]]:
    startup = pg.encode(
        pg.StartupMessage(pg.PROTOCOL_VERSION_3_0, (("user", "app"), ("database", "appdb")))
    )
    caps = (
        my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_PLUGIN_AUTH
        | my.CLIENT_CONNECT_WITH_DB | my.CLIENT_CONNECT_ATTRS
    )  # fmt: skip
    native = "mysql_native_password"
    greeting = mysql.HandshakeV10("10.11", 7, b"s" * 20, caps | my.CLIENT_SSL, 45, 2, native)
    attrs = (("_client_name", "t"),)
    response = mysql.HandshakeResponse41(caps, 1 << 24, 45, "a", b"x" * 20, "appdb", native, attrs)
    return {
        "postgres_frontend": [
            pg.encode(pg.SSLRequest()),
            startup,
            pg.encode(pg.CancelRequest(1234, b"k" * 4)),
            pg.encode(pg.GSSENCRequest()) + startup,
        ],
        "postgres_backend": [
            pg.encode(pg.AuthenticationSASL(("SCRAM-SHA-256",))),
            pg.encode(pg.AuthenticationOk())
            + pg.encode(pg.ParameterStatus("server_version", "15"))
            + pg.encode(pg.BackendKeyData(7, b"s" * 4))
            + pg.encode(pg.ReadyForQuery("I")),
            pg.encode(pg.ErrorResponse.make("FATAL", "28P01", "password authentication failed")),
            pg.encode(pg.AuthenticationMD5Password(b"salt")),
        ],
        "postgres_guard": [
            typed(b"Q", b"SELECT 1\0"),
            typed(b"Q", b"ALTER ROLE CURRENT_USER PASSWORD 'x'\0"),
            typed(b"P", b"s\0alter user x with password $$y$$\0\0\0") + typed(b"S", b""),
            typed(b"d", b"copy data") + typed(b"c", b""),
        ],
        "resp_commands": [
            b"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n",
            b"PING\r\n",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*1\r\n$5\r\nRESET\r\n",
            b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
        ],
        "resp_replies": [
            b"+OK\r\n",
            b"-ERR wrong password\r\n",
            b"%2\r\n+server\r\n+redis\r\n+proto\r\n:3\r\n",
            b"*2\r\n$3\r\nabc\r\n_\r\n",
        ],
        "mysql_client": [
            mysql.encode(mysql.SSLRequest(my.CLIENT_PROTOCOL_41 | my.CLIENT_SSL, 1 << 24, 45), 1)
            + b"\x16\x03\x01",
            mysql.encode(response, 1),
            mysql.encode(response, 1) + mysql.frame(b"auth data", 3),
        ],
        "mysql_server": [
            mysql.encode(greeting, 0) + mysql.encode(mysql.OkPacket(0, 0, 2, 0), 2),
            mysql.encode(greeting, 0)
            + mysql.encode(mysql.AuthSwitchRequest("client_ed25519", b"k" * 32), 2),
            mysql.encode(greeting, 0) + mysql.frame(b"\x01\x04", 2),
            mysql.frame(b"\xff\x10\x04Too many connections", 0),
        ],
        "mysql_commands": [
            mysql.frame(b"\x03SELECT 1", 0) + mysql.frame(b"\x03USE mysql", 0),
            mysql.frame(b"\x02otherdb", 0) + mysql.frame(b"\x11root\0\0", 0),
            mysql.frame(b"\x03/*!40101 use `x` */", 0) + mysql.frame(b"file", 2),
        ],
        "spiffe_id": [
            b"spiffe://example.org/ns/prod/sa/orders",
            b"spiffe://TD.TEST/x",
            b"example.org",
            b"spiffe://example.org/a\x00b",
        ],
        "config": [
            b"version: 1\nidentity: {trust_domain: example.org, x509_bundle: b.pem}\n"
            b"tls: {cert: c.pem, key: k.pem}\nservices:\n- name: db\n  adapter: postgres\n"
            b"  listen: 127.0.0.1:0\n  upstream: {address: 'db:5432', database: app}\n"
            b"  credentials: {from: vault-database, role: r}\n"
            b"  allow: [spiffe://example.org/a]\n",
            b"version: 1\nservices: []\n",
        ],
        "http_request_head": [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n",
        ],
    }


def main() -> None:
    for name, items in seeds().items():
        directory = CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (directory / f"seed-{i}").write_bytes(data)


if __name__ == "__main__":
    main()
