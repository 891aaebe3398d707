"""Audit sinks besides the file: syslog (RFC 5424) and OpenTelemetry logs (OTLP/HTTP JSON).

Each sink takes every audit line exactly as written to the file (hash chain included, so a
copy kept in a SIEM anchors the file's chain). The audit hot path never waits on a sink:
datagram syslog is one non-blocking send (dropped when the socket buffer is full); TCP
syslog and OTLP hand the line to a bounded queue a worker thread drains (dropped when full).
Drops are counted and logged at most once a minute; the file remains the record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
import urllib.request
from datetime import datetime

from broker.config.audit_sinks import OtlpConfig, SyslogConfig

log = logging.getLogger("sidekey.audit")

# Lines waiting for a TCP syslog or OTLP worker; past this they are dropped (a stuck
# receiver must not grow the broker's memory). At ~500 bytes a line: ~5 MB.
MAX_QUEUED_LINES = 10_000
# RFC 5426 lets receivers take datagrams up to 64 KiB less headers; longer messages are cut.
MAX_DATAGRAM_BYTES = 65_000
# OTLP: lines per export request, and how long a line may wait for a batch to fill.
OTLP_BATCH_LINES = 512
OTLP_BATCH_SECONDS = 1.0
# A receiver that refused a connection or a request is tried again after this long.
RETRY_SECONDS = 2.0
# How long close() lets the workers send what is queued.
FLUSH_SECONDS = 5.0
# Events that an operator's syslog rules should see as notices, not information.
NOTICE_EVENTS = frozenset({"deny", "offboard", "onboard", "session_closed", "credential_tampered"})


def _time_and_event(line: bytes) -> tuple[str, str]:
    """The audit line's own time and event (the encoder writes them first, always)."""
    # b'{"time":"2026-12-03T08:18:59.123456Z","event":"request",...'
    stamp = line[9:36].decode("ascii", "replace")
    end = line.find(b'"', 47)
    return stamp, line[47:end].decode("ascii", "replace")


class _Drops:
    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._logged = 0.0

    def add(self, why: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged > 60:
            self._logged = now
            log.warning("audit %s: dropping lines (%d so far): %s", self.what, self.count, why)


class SyslogSink:
    """RFC 5424 over UDP (RFC 5426), TCP with octet counting (RFC 6587), or a unix socket."""

    def __init__(self, config: SyslogConfig) -> None:
        self.config = config
        self.drops = _Drops("syslog")
        self._host = socket.gethostname()[:255] or "-"
        self._pid = str(os.getpid())
        self._sock: socket.socket | None = None
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if config.transport == "tcp":
            self._queue = queue.Queue(MAX_QUEUED_LINES)
            self._thread = threading.Thread(target=self._tcp_worker, name="sidekey-syslog",
                                            daemon=True)  # fmt: skip
            self._thread.start()
        else:
            family = socket.AF_UNIX if config.transport == "unix" else _family(config.host)
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    def frame(self, line: bytes) -> bytes:
        stamp, event = _time_and_event(line)
        severity = 5 if event in NOTICE_EVENTS else 6
        pri = self.config.facility * 8 + severity
        msgid = (event or "-")[:32]
        head = f"<{pri}>1 {stamp} {self._host} {self.config.app_name} {self._pid} {msgid} - "
        return head.encode() + line.rstrip(b"\n")

    def __call__(self, line: bytes) -> None:
        message = self.frame(line)
        if self._queue is not None:
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self.drops.add("the TCP receiver is not keeping up")
            return
        assert self._sock is not None
        try:
            target: str | tuple[str, int] = (
                self.config.path if self.config.transport == "unix"
                else (self.config.host, self.config.port)
            )  # fmt: skip
            self._sock.sendto(message[:MAX_DATAGRAM_BYTES], target)
        except OSError as exc:
            self.drops.add(str(exc))

    def _tcp_worker(self) -> None:
        assert self._queue is not None
        sock: socket.socket | None = None
        while True:
            message = self._queue.get()
            if message is None:
                break
            frame = f"{len(message)} ".encode() + message
            while True:
                try:
                    if sock is None:
                        sock = socket.create_connection(
                            (self.config.host, self.config.port), timeout=RETRY_SECONDS
                        )
                    sock.sendall(frame)
                    break
                except OSError as exc:
                    if sock is not None:
                        sock.close()
                    sock = None
                    self.drops.add(f"tcp {self.config.host}:{self.config.port}: {exc}")
                    time.sleep(RETRY_SECONDS)
                    if self._queue.qsize() >= MAX_QUEUED_LINES - 1:
                        break  # give this line up rather than stall behind it
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if self._queue is not None and self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(None, timeout=FLUSH_SECONDS)
            self._thread.join(FLUSH_SECONDS)
        if self._sock is not None:
            self._sock.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class OtlpSink:
    """OpenTelemetry logs over OTLP/HTTP with the JSON encoding, batched by a worker."""

    def __init__(self, config: OtlpConfig, service_name: str = "sidekey") -> None:
        self.config = config
        self.drops = _Drops("otlp")
        self.sent = 0
        self._resource = {"attributes": [
            {"key": "service.name", "value": {"stringValue": service_name}},
            {"key": "host.name", "value": {"stringValue": socket.gethostname()}},
        ]}  # fmt: skip
        self._queue: queue.Queue[bytes | None] = queue.Queue(MAX_QUEUED_LINES)
        self._thread = threading.Thread(target=self._worker, name="sidekey-otlp", daemon=True)
        self._thread.start()

    def __call__(self, line: bytes) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.drops.add("the OTLP receiver is not keeping up")

    def record(self, line: bytes) -> dict[str, object]:
        stamp, event = _time_and_event(line)
        try:
            nanos = int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            nanos = time.time_ns()
        notice = event in NOTICE_EVENTS
        return {
            "timeUnixNano": str(nanos),
            "observedTimeUnixNano": str(time.time_ns()),
            "severityNumber": 10 if notice else 9,  # INFO2 / INFO
            "severityText": "NOTICE" if notice else "INFO",
            "body": {"stringValue": line.rstrip(b"\n").decode("utf-8", "replace")},
            "attributes": [{"key": "event.name", "value": {"stringValue": event}}],
        }

    def _worker(self) -> None:
        done = False
        while not done:
            batch: list[bytes] = []
            deadline = time.monotonic() + OTLP_BATCH_SECONDS
            while len(batch) < OTLP_BATCH_LINES:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                batch.append(item)
            if batch:
                self._export(batch)

    def _export(self, batch: list[bytes]) -> None:
        body = json.dumps({"resourceLogs": [{
            "resource": self._resource,
            "scopeLogs": [{"scope": {"name": "sidekey.audit"},
                           "logRecords": [self.record(line) for line in batch]}],
        }]}).encode()  # fmt: skip
        headers = {"Content-Type": "application/json", **self.config.headers}
        request = urllib.request.Request(self.config.endpoint, body, headers, method="POST")  # noqa: S310
        try:
            # The endpoint is an http(s) URL from the config (parse_otlp checks the scheme).
            opened = urllib.request.urlopen(request, timeout=self.config.timeout)  # noqa: S310
            with opened as response:
                response.read()
        except OSError as exc:
            for _ in batch:
                self.drops.add(f"{self.config.endpoint}: {exc}")
            return
        self.sent += len(batch)

    def close(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=FLUSH_SECONDS)
        self._thread.join(FLUSH_SECONDS)
