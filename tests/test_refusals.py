"""The cap on `deny` lines for callers that proved no identity (broker/observe/refusals.py).

End to end: an HTTPS service refusing untrusted client certificates from two loopback
addresses, real TLS handshakes, the in-process broker and its audit file. The rules of the
windows are pinned below it with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from broker.observe.refusals import MAX_PEERS, RefusalLimiter, peer_host
from tests.brokers import audit_events, base_config, running_broker
from tests.pki import Pki, client_ssl_context
from tests.servers import OpenBao
from tests.test_http_adapter import SERVICE, Upstream, http_service, new_secret

LIMIT = 3


async def _refused_handshake(host: str, port: int, ctx: ssl.SSLContext, source: str) -> None:
    """One TLS handshake the broker refuses (an untrusted certificate), from `source`."""
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ctx, server_hostname="localhost", local_addr=(source, 0)
        )
        try:
            await asyncio.wait_for(reader.read(1), 10)
        finally:
            writer.close()


async def test_a_client_repeating_refused_handshakes_gets_a_few_lines_and_a_count(
    tmp_path: Path, pki: Pki, openbao: OpenBao, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream()
    await upstream.start()
    try:
        audit = tmp_path / "audit.jsonl"
        service = http_service(upstream.url, new_secret(openbao, upstream).path)
        config: dict[str, Any] = base_config(pki, services=[service], vault=openbao, audit=audit)
        config["audit"]["refusal_lines_per_minute"] = LIMIT
        untrusted = client_ssl_context(pki, pki.other_ca_client())
        async with running_broker(tmp_path, config, monkeypatch, vault=openbao) as broker:
            host, _, port = broker.address(SERVICE).rpartition(":")
            for _ in range(LIMIT + 5):
                await _refused_handshake(host, int(port), untrusted, "127.0.0.1")
            for _ in range(LIMIT + 1):
                await _refused_handshake(host, int(port), untrusted, "127.0.0.2")
            denials = audit_events(audit, "deny")
            assert [e["peer"].rpartition(":")[0] for e in denials] == (
                ["127.0.0.1"] * LIMIT + ["127.0.0.2"] * LIMIT
            ), denials
            assert audit_events(audit, "deny_suppressed") == [], "written when the minute ends"
            counted = broker.metrics.registry.get_sample_value(
                "sidekey_requests_total", {"service": SERVICE, "decision": "deny"}
            )
            assert counted == 2 * LIMIT + 6, "metrics count every refusal"
        # The broker stopped before the minute ended: the counts are written at its stop.
        summaries = audit_events(audit, "deny_suppressed")
        assert sorted((e["peer"], e["refusals"]) for e in summaries) == [
            ("127.0.0.1", 5),
            ("127.0.0.2", 1),
        ], summaries
        for e in summaries:
            assert e["service"] == SERVICE and e["window_seconds"] == 60
            assert "CERTIFICATE_VERIFY_FAILED" in e["reason"], e
        events = [e["event"] for e in audit_events(audit)]
        assert events.index("stop") > max(i for i, e in enumerate(events) if e == "deny_suppressed")
    finally:
        await upstream.stop()


# --------------------------------------------------------------------------- the rules


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(lines: int = 2) -> tuple[RefusalLimiter, Clock, list[dict[str, Any]]]:
    clock = Clock()
    written: list[dict[str, Any]] = []
    return RefusalLimiter(lines, written.append, clock=clock), clock, written


def test_each_minute_starts_afresh_and_its_rest_is_summed_once() -> None:
    refusals, clock, summaries = limiter()
    admitted = [refusals.admit("db", "postgres", "10.0.0.1:4000", f"r{i}") for i in range(5)]
    assert admitted == [True, True, False, False, False]
    clock.now += 59
    refusals.flush(clock.now)
    assert summaries == [], "the minute is not over"
    clock.now += 1
    assert refusals.admit("db", "postgres", "10.0.0.1:4001", "again")  # a new minute
    assert summaries == [
        {"service": "db", "adapter": "postgres", "peer": "10.0.0.1", "refusals": 3,
         "window_seconds": 60.0, "reason": "r4"}
    ]  # fmt: skip
    clock.now += 60
    refusals.flush(clock.now)
    assert len(summaries) == 1, "a minute that suppressed nothing writes nothing"


def test_peers_and_services_are_counted_apart_and_zero_writes_everything() -> None:
    refusals, _, _ = limiter(lines=1)
    assert refusals.admit("db", "postgres", "10.0.0.1:1", "r")
    assert refusals.admit("db", "postgres", "10.0.0.2:1", "r")
    assert refusals.admit("api", "http", "10.0.0.1:1", "r")
    assert not refusals.admit("db", "postgres", "10.0.0.1:2", "r")
    refusals.lines_per_minute = 0  # a reload turned the cap off
    assert all(refusals.admit("db", "postgres", "10.0.0.1:3", "r") for _ in range(100))


def test_past_max_peers_the_others_share_one_count() -> None:
    refusals, clock, summaries = limiter(lines=1)
    for i in range(MAX_PEERS):
        assert refusals.admit("db", "postgres", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:1", "r")
    assert refusals.admit("db", "postgres", "192.0.2.1:1", "r")  # the first of "*"
    assert not refusals.admit("db", "postgres", "192.0.2.2:1", "r")
    clock.now += 60
    refusals.close()
    assert [(s["peer"], s["refusals"]) for s in summaries] == [("*", 1)]


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("10.0.0.1:5432", "10.0.0.1"),
        ("[::1]:5432", "[::1]"),
        ("unix:pid=42,uid=1000,gid=1000", "unix:uid=1000"),
        ("unix", "unix"),
        ("?", "?"),
    ],
)
def test_a_peer_is_its_host_or_uid(peer: str, host: str) -> None:
    assert peer_host(peer) == host


async def test_a_summary_is_written_when_its_window_ends_without_another_refusal() -> None:
    written: list[dict[str, Any]] = []
    refusals = RefusalLimiter(1, written.append, window=0.05)
    for source in ("10.0.0.1:1", "10.0.0.1:2", "10.0.0.2:1", "10.0.0.2:2", "10.0.0.2:3"):
        refusals.admit("db", "postgres", source, "r")
    deadline = asyncio.get_running_loop().time() + 10
    while len(written) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert sorted((s["peer"], s["refusals"]) for s in written) == [
        ("10.0.0.1", 1),
        ("10.0.0.2", 2),
    ]
    refusals.close()
    assert len(written) == 2, "nothing left to write at the stop"
