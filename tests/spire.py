"""Real SPIRE for the tests: a server and an agent on loopback and a unix socket.

The session-scoped `spire` fixture starts ``spire-server`` (join-token node attestation, a
SQLite datastore, X.509-SVIDs of one minute by default) listening on a free 127.0.0.1 port,
and ``spire-agent`` (unix workload attestor, Workload API on a unix socket) joined to it with a
join token, then registers two workloads by their unix uid:

- the broker: `BROKER_ID` for uid 0 (the test process itself, which runs as root), with an
  X.509-SVID TTL of `BROKER_SVID_TTL` (60 s: the agent renews it at half its life, so a new
  one arrives about every 30 s) and the DNS SAN ``localhost``, so clients can verify the
  broker by host name;
- a client: `CLIENT_ID` for uid `CLIENT_UID` (``nobody``), with an hour-long X.509-SVID, for
  the callers of the tests. Its SVIDs and JWT-SVIDs are fetched by running the agent's own
  CLI under that uid (``spire-agent api fetch x509|jwt``).

Both IDs are the ones `tests.pki` uses, so configs and allow rules carry over. Register more
workloads under other uids with `Spire.register` (uid 1 and 2, ``daemon`` and ``bin``, exist
on Debian); entries are delivered to the agent within its 5 s sync interval.

    def test_workload_api(spire):
        token = spire.fetch_jwt("orders-api")              # a JWT-SVID of CLIENT_ID
        svid = spire.fetch_x509(tmp_path)                   # CLIENT_ID's cert, key, bundle
        config["identity"]["workload_api"] = spire.endpoint  # the broker's SVID from SPIRE

The binaries come from ``scripts/build-spire.sh`` (``make spire``, a dependency of ``make
test``). The fixture's files live in a world-traversable directory under /tmp rather than
pytest's (mode 0700) tmp dir, so processes under another uid can reach the agent's socket.
Everything started here is stopped by its PID at teardown.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import free_port

SPIRE_VERSION = "1.13.3"
SPIRE_BIN = (
    Path(os.environ.get("SIDEKEY_CACHE", Path.home() / ".cache" / "sidekey"))
    / f"spire-{SPIRE_VERSION}"
    / "bin"
)

TRUST_DOMAIN = "example.org"
NODE_ID = f"spiffe://{TRUST_DOMAIN}/node/test"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/sidekey"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/orders"
BROKER_UID = 0
# nobody: present on every Debian machine, and owns nothing the tests care about.
CLIENT_UID = 65534

# The broker's X.509-SVID lives a minute, so two rotations fit in about a minute of test.
BROKER_SVID_TTL = 60
# Clients keep one certificate for the length of a test.
CLIENT_SVID_TTL = 3600
# JWT-SVIDs the tests mint (SPIRE's default is 5 minutes).
JWT_SVID_TTL = 300
# The server's CA: long enough that no test sees it rotate unless it asks to
# (`prepare_authority` / `activate_authority`).
CA_TTL = "6h"
# Server and agent each start in well under a second here; this covers a loaded 2-core CI.
SPIRE_START_SECONDS = 60.0
# A new registration entry reaches the agent within its sync interval (5 s).
SVID_WAIT_SECONDS = 60.0
# One CLI call against a running server or agent.
CLI_SECONDS = 30.0
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class FetchedSvid:
    """An X.509-SVID fetched from the agent, written as files curl/ssl/libpq load as is."""

    spiffe_id: str
    cert: Path
    key: Path
    bundle: Path


@dataclass
class Spire:
    """A running SPIRE server and agent. See the module docstring."""

    workdir: Path
    server_port: int
    trust_domain: str = TRUST_DOMAIN
    # The broker's registration entry (BROKER_ID for uid 0), for `update`.
    broker_entry: str = ""
    _server: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _agent: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def server_socket(self) -> Path:
        return self.workdir / "server" / "api.sock"

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "agent" / "api.sock"

    @property
    def endpoint(self) -> str:
        """The Workload API address, as `identity.workload_api` and SPIFFE_ENDPOINT_SOCKET
        take it."""
        return f"unix://{self.agent_socket}"

    # ----------------------------------------------------------------------- the server

    def server(self, *args: str) -> str:
        """Run ``spire-server ARGS -socketPath ...`` and return its output; raise on failure."""
        return _run(
            [str(SPIRE_BIN / "spire-server"), *args, "-socketPath", str(self.server_socket)]
        )

    def bundle_pem(self) -> bytes:
        """The trust domain's current X.509 bundle (every CA the server trusts), as PEM."""
        return self.server("bundle", "show", "-format", "pem").encode()

    def register(
        self,
        spiffe_id: str,
        *,
        uid: int,
        x509_ttl: int = CLIENT_SVID_TTL,
        jwt_ttl: int = JWT_SVID_TTL,
        dns: Sequence[str] = (),
        federates_with: Sequence[str] = (),
    ) -> str:
        """Register a workload by its unix uid; returns the entry ID (for `unregister`)."""
        args = ["entry", "create", "-parentID", NODE_ID, "-spiffeID", spiffe_id]
        args += ["-selector", f"unix:uid:{uid}"]
        args += ["-x509SVIDTTL", str(x509_ttl), "-jwtSVIDTTL", str(jwt_ttl)]
        for name in dns:
            args += ["-dns", name]
        for domain in federates_with:
            args += ["-federatesWith", f"spiffe://{domain}"]
        out = self.server(*args)
        found = re.search(r"Entry ID\s*:\s*(\S+)", out)
        assert found, out
        return found.group(1)

    def update(
        self,
        entry_id: str,
        spiffe_id: str,
        *,
        uid: int,
        x509_ttl: int = CLIENT_SVID_TTL,
        jwt_ttl: int = JWT_SVID_TTL,
        dns: Sequence[str] = (),
        federates_with: Sequence[str] = (),
    ) -> None:
        """Replace an entry's fields (give them all: what is left out is cleared)."""
        args = ["entry", "update", "-entryID", entry_id, "-parentID", NODE_ID]
        args += ["-spiffeID", spiffe_id, "-selector", f"unix:uid:{uid}"]
        args += ["-x509SVIDTTL", str(x509_ttl), "-jwtSVIDTTL", str(jwt_ttl)]
        for name in dns:
            args += ["-dns", name]
        for domain in federates_with:
            args += ["-federatesWith", f"spiffe://{domain}"]
        self.server(*args)

    def update_broker(self, federates_with: Sequence[str] = ()) -> None:
        """The broker's entry as the fixture made it, federating with `federates_with`."""
        self.update(
            self.broker_entry,
            BROKER_ID,
            uid=BROKER_UID,
            x509_ttl=BROKER_SVID_TTL,
            dns=["localhost"],
            federates_with=federates_with,
        )

    def unregister(self, entry_id: str) -> None:
        self.server("entry", "delete", "-entryID", entry_id)

    def entry_ids(self, spiffe_id: str) -> list[str]:
        out = self.server("entry", "show", "-spiffeID", spiffe_id)
        return re.findall(r"Entry ID\s*:\s*(\S+)", out)

    def set_federated_bundle(self, trust_domain: str, pem: bytes) -> None:
        """Give the server another trust domain's X.509 bundle (what a federation
        relationship would fetch); entries that federate with it then carry it to workloads."""
        path = self.workdir / f"federated-{trust_domain}.pem"
        path.write_bytes(pem)
        self.server(
            "bundle", "set", "-format", "pem", "-id", f"spiffe://{trust_domain}", "-path", str(path)
        )

    def prepare_authority(self) -> None:
        """Prepare a new X.509 CA: it joins the bundle (a bundle update for every workload)
        but does not sign yet."""
        self.server("localauthority", "x509", "prepare")

    def prepare_jwt_authority(self) -> None:
        """Prepare a new JWT signing key: it joins the JWT bundle (a JWT bundle update)."""
        self.server("localauthority", "jwt", "prepare")

    def activate_authority(self) -> None:
        """Make the prepared X.509 CA the signing one; the old one stays in the bundle."""
        out = self.server("localauthority", "x509", "show")
        found = re.search(r"Prepared X\.509 authority:\s*\n\s*Authority ID:\s*(\S+)", out)
        assert found, out
        self.server("localauthority", "x509", "activate", "-authorityID", found.group(1))

    # ------------------------------------------------------------------------ the agent

    def agent_cli(self, *args: str, uid: int = CLIENT_UID) -> str:
        """Run ``spire-agent ARGS -socketPath ...`` as `uid` (the workload it attests)."""
        binary = self.workdir / "bin" / "spire-agent"
        return _run([str(binary), *args, "-socketPath", str(self.agent_socket)], uid=uid)

    def fetch_x509(self, directory: Path, uid: int = CLIENT_UID) -> FetchedSvid:
        """The X.509-SVID the agent gives `uid` (the client by default), written to
        `directory` as ``svid.pem``, ``svid-key.pem`` (mode 0600) and ``bundle.pem``."""
        drop = Path(tempfile.mkdtemp(prefix="fetch-", dir=self.workdir))
        try:
            os.chmod(drop, 0o777)  # written by `uid`
            out = self.agent_cli("api", "fetch", "x509", "-write", str(drop), uid=uid)
            found = re.search(r"SPIFFE ID:\s*(\S+)", out)
            assert found, out
            directory.mkdir(parents=True, exist_ok=True)
            svid = FetchedSvid(
                found.group(1),
                directory / "svid.pem",
                directory / "svid-key.pem",
                directory / "bundle.pem",
            )
            svid.cert.write_bytes((drop / "svid.0.pem").read_bytes())
            svid.key.touch(mode=0o600)
            svid.key.write_bytes((drop / "svid.0.key").read_bytes())
            svid.bundle.write_bytes((drop / "bundle.0.pem").read_bytes())
            return svid
        finally:
            shutil.rmtree(drop, ignore_errors=True)

    def fetch_jwt(self, audience: str, uid: int = CLIENT_UID) -> str:
        """A JWT-SVID minted by the agent for the workload `uid` (the client by default)."""
        out = self.agent_cli("api", "fetch", "jwt", "-audience", audience, uid=uid)
        found = re.search(r"token\([^)]*\):\s*(\S+)", out)
        assert found, out
        return found.group(1)

    def wait_for_svid(self, spiffe_id: str, uid: int, timeout: float = SVID_WAIT_SECONDS) -> None:
        """Wait until the agent serves `spiffe_id` to `uid` (a new entry takes a sync)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self.agent_cli("api", "fetch", "x509", uid=uid)
                if spiffe_id in last:
                    return
            except SpireError as exc:
                last = str(exc)
            time.sleep(POLL_SECONDS)
        raise SpireError(f"the agent did not serve {spiffe_id} to uid {uid} in {timeout}s: {last}")

    def stop_agent(self) -> None:
        """Stop the agent: its Workload API socket goes away (the lost-agent case)."""
        if self._agent is not None:
            _stop(self._agent)
            self._agent = None

    def start_agent(self) -> None:
        """(Re)start the agent. It keeps its node SVID and key on disk, so a restart needs no
        new join token; returns once the Workload API answers the broker's uid again."""
        assert self._agent is None, "the agent is running"
        self._agent = _start(
            [str(SPIRE_BIN / "spire-agent"), "run", "-config", str(self.workdir / "agent.conf")],
            self.workdir / "agent.log",
        )
        _wait_healthy(self._agent, "spire-agent", self.agent_socket, self.workdir / "agent.log")
        self.wait_for_svid(BROKER_ID, BROKER_UID)

    def log(self, which: str = "agent") -> str:
        return (self.workdir / f"{which}.log").read_text(errors="replace")

    def stop(self) -> None:
        self.stop_agent()
        if self._server is not None:
            _stop(self._server)
            self._server = None


class SpireError(AssertionError):
    """A SPIRE command failed; the message carries its output."""


def start_spire(workdir: Path) -> Spire:
    """Start a server and an agent in `workdir` and register the broker and the client."""
    for binary in ("spire-server", "spire-agent"):
        if not (SPIRE_BIN / binary).is_file():
            pytest.fail(f"{SPIRE_BIN / binary} is missing: build it with `make spire`")
    for sub in ("bin", "server", "agent", "server-data", "agent-data"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    # World-traversable path to the socket and the CLI, for workloads under other uids.
    for path in (workdir, workdir / "bin", workdir / "agent"):
        os.chmod(path, 0o755)
    cli = workdir / "bin" / "spire-agent"
    try:
        os.link(SPIRE_BIN / "spire-agent", cli)  # the cache sits under root's 0700 home
    except OSError:
        shutil.copy2(SPIRE_BIN / "spire-agent", cli)
    os.chmod(cli, 0o755)

    spire = Spire(workdir=workdir, server_port=free_port())
    (workdir / "server.conf").write_text(_server_conf(spire))
    spire._server = _start(
        [str(SPIRE_BIN / "spire-server"), "run", "-config", str(workdir / "server.conf")],
        workdir / "server.log",
    )
    try:
        _wait_healthy(spire._server, "spire-server", spire.server_socket, workdir / "server.log")
        (workdir / "bootstrap.pem").write_bytes(spire.bundle_pem())
        out = spire.server("token", "generate", "-spiffeID", NODE_ID, "-ttl", "600")
        token = out.split()[-1]
        (workdir / "agent.conf").write_text(_agent_conf(spire, token))
        spire.broker_entry = spire.register(
            BROKER_ID, uid=BROKER_UID, x509_ttl=BROKER_SVID_TTL, dns=["localhost"]
        )
        spire.register(CLIENT_ID, uid=CLIENT_UID)
        spire.start_agent()
        spire.wait_for_svid(CLIENT_ID, CLIENT_UID)
    except BaseException:
        spire.stop()
        raise
    return spire


@pytest.fixture(scope="session")
def spire() -> Iterator[Spire]:
    """One SPIRE server and agent per test session (see the module docstring)."""
    # Not pytest's tmp dir: its parents are mode 0700, and the client runs as nobody.
    workdir = Path(tempfile.mkdtemp(prefix="sidekey-spire-"))
    try:
        running = start_spire(workdir)
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- helpers


def _server_conf(spire: Spire) -> str:
    w = spire.workdir
    return f"""
server {{
  bind_address = "127.0.0.1"
  bind_port = "{spire.server_port}"
  socket_path = "{spire.server_socket}"
  trust_domain = "{spire.trust_domain}"
  data_dir = "{w / "server-data"}"
  log_level = "INFO"
  ca_key_type = "ec-p256"
  ca_ttl = "{CA_TTL}"
  default_x509_svid_ttl = "{BROKER_SVID_TTL}s"
  default_jwt_svid_ttl = "{JWT_SVID_TTL}s"
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{w / "server-data" / "datastore.sqlite3"}"
    }}
  }}
  KeyManager "memory" {{ plugin_data {{}} }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
}}
"""


def _agent_conf(spire: Spire, token: str) -> str:
    w = spire.workdir
    # KeyManager "disk": the node key survives a restart, so `start_agent` needs no new token.
    return f"""
agent {{
  data_dir = "{w / "agent-data"}"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "{spire.server_port}"
  socket_path = "{spire.agent_socket}"
  trust_domain = "{spire.trust_domain}"
  trust_bundle_path = "{w / "bootstrap.pem"}"
  join_token = "{token}"
}}
plugins {{
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "disk" {{ plugin_data {{ directory = "{w / "agent-data"}" }} }}
  WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"""


def _run(cmd: list[str], uid: int | None = None) -> str:
    """Run `cmd` as `uid`. The uid switch is setpriv's, not subprocess's ``user=``: with
    ``user=`` CPython forks (no vfork), and a fork of this multi-threaded process (gRPC's
    threads from py-spiffe) died of SIGBUS before exec under load in CI."""
    if uid is not None and uid != os.getuid():
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise SpireError(f"{' '.join(cmd)}: no answer in {CLI_SECONDS}s") from None
    if done.returncode != 0:
        raise SpireError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr or done.stdout}")
    return done.stdout


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen[bytes], name: str, socket: Path, log: Path) -> None:
    deadline = time.monotonic() + SPIRE_START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SpireError(f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}")
        done = subprocess.run(
            [str(SPIRE_BIN / name), "healthcheck", "-socketPath", str(socket)],
            capture_output=True,
            timeout=CLI_SECONDS,
            check=False,
        )
        if done.returncode == 0:
            return
        time.sleep(POLL_SECONDS)
    raise SpireError(f"{name} not healthy in {SPIRE_START_SECONDS}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
