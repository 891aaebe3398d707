"""The adapter's SCRAM-SHA-256 client against scramp's server, its key cache, and cancel keys
(and how a cancel is handed to a sibling worker)."""

from __future__ import annotations

import base64

import pytest
from scramp import ScramMechanism

from adapters.postgres._cancel import (
    CancelCaller,
    CancelKeys,
    CancelTarget,
    cancel_fields,
    parse_cancel_fields,
)
from adapters.postgres._scram import (
    MAX_ITERATIONS,
    ScramClient,
    ScramError,
    ScramKeyCache,
    normalize_password,
)

PASSWORD = "correct horse battery staple"


def _exchange(client: ScramClient, password: str, iterations: int = 4096) -> None:
    mechanism = ScramMechanism()
    auth_info = mechanism.make_auth_info(password, iteration_count=iterations)
    server = mechanism.make_server(lambda _user: auth_info)
    server.set_client_first(client.client_first().decode())
    client_final = client.client_final(server.get_server_first().encode())
    server.set_client_final(client_final.decode())
    client.verify_server_final(server.get_server_final().encode())


@pytest.mark.parametrize("password", [PASSWORD, "pässwörd", "\u2168 roman nine"])
def test_client_authenticates_to_scramp_server(password: str) -> None:
    _exchange(ScramClient(password, ScramKeyCache(), username="u"), password)


def test_wrong_password_is_rejected_by_the_server() -> None:
    mechanism = ScramMechanism()
    auth_info = mechanism.make_auth_info(PASSWORD)
    server = mechanism.make_server(lambda _user: auth_info)
    client = ScramClient("wrong", ScramKeyCache(), username="u")
    server.set_client_first(client.client_first().decode())
    final = client.client_final(server.get_server_first().encode())
    with pytest.raises(Exception, match="keys don't match"):
        server.set_client_final(final.decode())


def test_keys_are_derived_once_per_password_salt_and_iterations() -> None:
    cache = ScramKeyCache()
    mechanism = ScramMechanism()
    auth_info = mechanism.make_auth_info(PASSWORD, iteration_count=4096)
    for _ in range(3):
        client = ScramClient(PASSWORD, cache, username="u")
        server = mechanism.make_server(lambda _user: auth_info)
        server.set_client_first(client.client_first().decode())
        final = client.client_final(server.get_server_first().encode())
        server.set_client_final(final.decode())
        client.verify_server_final(server.get_server_final().encode())
    assert cache.derivations == 1
    # Another password (a new lease) or another salt derives again.
    _exchange(ScramClient("other", cache, username="u"), "other")
    assert cache.derivations == 2 and len(cache) == 2


def test_cache_is_bounded() -> None:
    cache = ScramKeyCache(max_entries=2)
    for i in range(5):
        cache.keys_for(b"pw", bytes([i]) * 16, 4096)
    assert len(cache) == 2 and cache.derivations == 5


def _server_first(
    client: ScramClient, *, suffix: str = "srv", salt: bytes = b"s" * 16, iterations: int = 4096
) -> bytes:
    nonce = client.client_first().decode().split("r=", 1)[1]
    return f"r={nonce}{suffix},s={base64.b64encode(salt).decode()},i={iterations}".encode()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"r=someone-elses-nonce,s=c2FsdA==,i=4096", "does not extend"),
        (b"e=other-error", "SCRAM error"),
        (b"s=c2FsdA==,i=4096", "lacks"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_malformed_server_first_is_refused(message: bytes, error: str) -> None:
    client = ScramClient(PASSWORD, ScramKeyCache())
    client.client_first()
    with pytest.raises(ScramError, match=error):
        client.client_final(message)


@pytest.mark.parametrize("iterations", [1, 4095, MAX_ITERATIONS + 1])
def test_iteration_count_outside_bounds_is_refused(iterations: int) -> None:
    client = ScramClient(PASSWORD, ScramKeyCache())
    with pytest.raises(ScramError, match="iteration count"):
        client.client_final(_server_first(client, iterations=iterations))


def test_nonce_must_be_extended() -> None:
    client = ScramClient(PASSWORD, ScramKeyCache())
    with pytest.raises(ScramError, match="does not extend"):
        client.client_final(_server_first(client, suffix=""))


def test_server_that_does_not_know_the_key_is_refused() -> None:
    client = ScramClient(PASSWORD, ScramKeyCache())
    client.client_final(_server_first(client))
    forged = base64.b64encode(b"\0" * 32).decode()
    with pytest.raises(ScramError, match="does not match"):
        client.verify_server_final(f"v={forged}".encode())
    with pytest.raises(ScramError, match="SCRAM error"):
        client.verify_server_final(b"e=invalid-proof")


def test_server_final_before_client_final_is_refused() -> None:
    with pytest.raises(ScramError):
        ScramClient(PASSWORD, ScramKeyCache()).verify_server_final(b"v=AAAA")


def test_normalize_password_follows_postgres() -> None:
    # SASLprep maps non-ASCII spaces to a space; a prohibited character makes PostgreSQL use
    # the password as it is.
    assert normalize_password("a\u00a0b") == b"a b"
    assert normalize_password("bad\u0007bell") == "bad\u0007bell".encode()


def test_cancel_keys_map_only_their_own_session() -> None:
    keys = CancelKeys()
    target = CancelTarget(4242, b"\1\2\3\4", "spiffe://example.org/a")
    pid, secret = keys.issue(target)
    assert pid == 4242, "the client sees the server's own pid"
    assert len(secret) == 4 and secret != b"\1\2\3\4"
    assert keys.find(pid, secret) == target
    assert keys.find(pid, bytes(4)) is None or secret == bytes(4)
    assert keys.find(4242, b"\1\2\3\4") is None, "the upstream key is not a broker key"
    long_target = CancelTarget(7, b"k" * 32, "spiffe://example.org/b")
    pid2, secret2 = keys.issue(long_target)
    assert len(secret2) == 32 and pid2 == 7
    # Two servers behind one address may share a pid: each key leads to its own session.
    twin = CancelTarget(4242, b"\5\6\7\x08", "spiffe://example.org/c")
    pid3, secret3 = keys.issue(twin)
    assert pid3 == 4242 and keys.find(pid3, secret3) == twin and keys.find(pid, secret) == target
    keys.forget(pid, secret)
    assert keys.find(pid, secret) is None and keys.find(pid3, secret3) == twin
    assert len(keys) == 2


def test_a_cancel_travels_to_a_sibling_worker_with_its_caller() -> None:
    owner = "spiffe://example.org/a"
    target = CancelTarget(4242, b"\1\2\3\4", owner)
    assert CancelCaller(False, None).may_cancel(target), "no certificate: the key decides"
    assert CancelCaller(True, owner).may_cancel(target)
    assert not CancelCaller(True, "spiffe://example.org/b").may_cancel(target)
    assert not CancelCaller(True, None).may_cancel(target), "a certificate proving no ID"
    caller = CancelCaller(True, owner)
    fields = cancel_fields(4242, b"\xff" * 256, caller)
    assert parse_cancel_fields(fields) == (4242, b"\xff" * 256, caller)
    for bad in (
        {**fields, "secret_key": "zz"},
        {**fields, "secret_key": ""},
        {**fields, "secret_key": "00" * 257},
        {**fields, "process_id": "4242"},
        {**fields, "certificate": 1},
        {**fields, "spiffe_id": "s" * 2049},
        {k: v for k, v in fields.items() if k != "certificate"},
    ):
        with pytest.raises(ValueError, match="malformed cancel request") as raised:
            parse_cancel_fields(bad)
        assert "ff" not in str(raised.value), "no key in the error"


def test_normalized_passwords_are_remembered_per_password() -> None:
    cache = ScramKeyCache(max_entries=2)
    for password in ("a\u00a0b", "bad\u0007bell", PASSWORD):
        assert cache.normalized(password) == normalize_password(password)
        assert cache.normalized(password) == normalize_password(password)
    assert len(cache._normalized) == 2, "bounded like the key cache"
    assert all(PASSWORD.encode() not in key for key in cache._normalized), "keyed by HMAC"
