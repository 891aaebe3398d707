"""A throwaway rsyslogd (Debian's rsyslog) listening on loopback UDP and TCP ports, writing
every message it parsed (RFC 5424 fields and the message) to a file the test reads."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port

START_SECONDS = 20.0
POLL_SECONDS = 0.05
TEMPLATE = (
    "%msgid%|%app-name%|%procid%|%syslogfacility-text%|%syslogseverity-text%|"
    "%timereported:::date-rfc3339%|%msg%\\n"
)


@dataclass
class Rsyslog:
    udp: int
    tcp: int
    out: Path
    proc: subprocess.Popen[bytes] = field(repr=False)

    def lines(self) -> list[list[str]]:
        if not self.out.exists():
            return []
        return [line.split("|", 6) for line in self.out.read_text().splitlines()]

    def wait_for(self, count: int, deadline: float = 20.0) -> list[list[str]]:
        end = time.monotonic() + deadline
        while len(self.lines()) < count:
            if time.monotonic() > end:
                raise AssertionError(f"rsyslog got {len(self.lines())} of {count} messages")
            time.sleep(POLL_SECONDS)
        return self.lines()


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not Path(binary).exists():
        pytest.skip("rsyslog is not installed (scripts/system-deps.sh installs it)")
    work = tmp_path / "rsyslog"
    work.mkdir()
    udp, tcp, out = free_port(), free_port(), work / "out.log"
    conf = work / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{work}")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="string" string="{TEMPLATE}")
*.* action(type="omfile" file="{out}" template="fields")
""")
    proc = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-i", str(work / "pid")],
        stdout=subprocess.DEVNULL, stderr=(work / "stderr").open("wb"),
    )  # fmt: skip
    server = Rsyslog(udp, tcp, out, proc)
    import socket

    end = time.monotonic() + START_SECONDS
    while True:  # ready once the TCP input accepts
        if proc.poll() is not None:
            raise RuntimeError((work / "stderr").read_text())
        try:
            socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(POLL_SECONDS)
    try:
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
