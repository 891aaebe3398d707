"""A real three-node OpenBao cluster with integrated (Raft) storage on loopback.

Not dev mode: every node runs from a config file with Raft storage and a TLS listener (a
trustme CA the tests trust through `ca_path`); node 0 is initialised with one unseal key,
unsealed, and the others join it over the API and are unsealed with the same key. The
fixture waits until all three are Raft voters, so stopping any one node leaves a quorum.

    def test_failover(bao_cluster):
        active = bao_cluster.active()          # the node that answers as active
        active.kill()
        bao_cluster.wait_for_new_active(active)

Each node's log is in its directory. Every process is stopped by its PID at teardown.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import pytest
import trustme

from tests.servers import POLL_SECONDS, _bao_binary, _stop_pid, free_port

NODES = 3
# Init, unseal and three joins take a few seconds; autopilot then promotes the joiners to
# voters once they have been healthy for SERVER_STABILIZATION (below). A loaded CI box is slow.
CLUSTER_START_SECONDS = 90.0
# Autopilot's wait before a healthy non-voter becomes a voter (default 10 s): shortened so
# the fixture is ready sooner.
SERVER_STABILIZATION = "2s"
# A node answering HTTP 200 on sys/health is active; 429 is an unsealed standby.
HEALTH_ACTIVE, HEALTH_STANDBY = 200, 429
# Raft timing: performance_multiplier 1 is the production setting (heartbeats and election
# timeouts of ~1 s) rather than the development default of 5, so elections take seconds.
PERFORMANCE_MULTIPLIER = 1


@dataclass
class BaoNode:
    index: int
    address: str  # https://127.0.0.1:<api port>
    cluster_port: int
    workdir: Path
    ca_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str:
        return f"node{self.index}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> int | None:
        """sys/health's status code (200 active, 429 standby, 503 sealed...), None if down."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        try:
            with urllib.request.urlopen(
                f"{self.address}/v1/sys/health", timeout=1, context=ctx
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def stop(self) -> None:
        """SIGTERM (the node steps down gracefully), SIGKILL after a grace period."""
        if self.proc is not None:
            _stop_pid(self.proc)

    def kill(self) -> None:
        """SIGKILL: the node is gone at once, as in a crash (no step-down, no handover)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        path = self.workdir / "bao.log"
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class BaoCluster:
    """Three Raft nodes; `token` is the root token, `unseal_key` the one key share."""

    nodes: list[BaoNode]
    ca_path: Path
    token: str = field(default="", repr=False)
    unseal_key: str = field(default="", repr=False)

    @property
    def addresses(self) -> list[str]:
        return [node.address for node in self.nodes]

    @property
    def address(self) -> str:
        """The active node's address (what configure_database and friends talk to)."""
        return self.active().address

    def client(self, token: str | None = None, node: BaoNode | None = None) -> hvac.Client:
        target = node or self.active()
        return hvac.Client(
            url=target.address,
            token=self.token if token is None else token,
            verify=str(self.ca_path),
        )

    def active(self) -> BaoNode:
        for node in self.nodes:
            if node.running and node.health() == HEALTH_ACTIVE:
                return node
        raise RuntimeError("no active OpenBao node")

    def wait_for_new_active(self, old: BaoNode, timeout: float = CLUSTER_START_SECONDS) -> BaoNode:
        """Poll the surviving nodes until one is active; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node is not old and node.running and node.health() == HEALTH_ACTIVE:
                    return node
            time.sleep(POLL_SECONDS)
        raise RuntimeError(f"no new active node within {timeout}s")

    def voters(self) -> list[str]:
        config = self.client().adapter.get("/v1/sys/storage/raft/configuration")
        return [s["node_id"] for s in config["data"]["config"]["servers"] if s["voter"]]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _write_config(node: BaoNode, cert: Path, key: Path) -> Path:
    api_port = int(node.address.rsplit(":", 1)[1])
    config = f"""
storage "raft" {{
  path = "{node.workdir / "raft"}"
  node_id = "{node.node_id}"
  performance_multiplier = {PERFORMANCE_MULTIPLIER}
}}
listener "tcp" {{
  address = "127.0.0.1:{api_port}"
  cluster_address = "127.0.0.1:{node.cluster_port}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
api_addr = "{node.address}"
cluster_addr = "https://127.0.0.1:{node.cluster_port}"
disable_mlock = true
ui = false
log_level = "info"
"""
    path = node.workdir / "bao.hcl"
    path.write_text(config)
    return path


def _start_node(node: BaoNode, config: Path) -> None:
    (node.workdir / "raft").mkdir(parents=True, exist_ok=True)
    env = {
        "HOME": str(node.workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BAO_DISABLE_MLOCK": "true",
    }
    with (node.workdir / "bao.log").open("ab") as log:
        node.proc = subprocess.Popen(
            [_bao_binary(), "server", f"-config={config}"],
            cwd=node.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _post(node: BaoNode, path: str, body: dict[str, Any], token: str = "") -> Any:
    client = hvac.Client(url=node.address, token=token, verify=str(node.ca_path))
    return client.adapter.post(f"/v1/{path}", json=body)


def _wait(predicate: Any, what: str, deadline: float, cluster: BaoCluster) -> Any:
    while True:
        try:
            result = predicate()
        except (hvac.exceptions.VaultError, OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        for node in cluster.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"{node.node_id} exited:\n{node.log()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n.node_id}\n{n.log()[-2000:]}" for n in cluster.nodes)
            raise RuntimeError(f"OpenBao cluster: {what} not reached in time\n{logs}")
        time.sleep(POLL_SECONDS)


def start_cluster(base: Path, nodes: int = NODES) -> BaoCluster:
    """Start, initialise, unseal and join a Raft cluster; returns when all are voters."""
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1", "localhost")
    ca_path, cert, key = base / "ca.pem", base / "node.pem", base / "node-key.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    served.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(p.bytes() for p in served.cert_chain_pems))
    members = [
        BaoNode(i, f"https://127.0.0.1:{free_port()}", free_port(), base / f"node{i}", ca_path)
        for i in range(nodes)
    ]
    cluster = BaoCluster(members, ca_path)
    deadline = time.monotonic() + CLUSTER_START_SECONDS
    try:
        for node in members:
            node.workdir.mkdir(parents=True)
            _start_node(node, _write_config(node, cert, key))
        first = members[0]
        _wait(lambda: first.health() is not None, "node0 listening", deadline, cluster)
        init = _post(first, "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        cluster.token, cluster.unseal_key = init["root_token"], init["keys_base64"][0]
        _post(first, "sys/unseal", {"key": cluster.unseal_key})
        _wait(lambda: first.health() == HEALTH_ACTIVE, "node0 active", deadline, cluster)
        cluster.client(node=first).adapter.post(
            "/v1/sys/storage/raft/autopilot/configuration",
            json={"server_stabilization_time": SERVER_STABILIZATION, "cleanup_dead_servers": False},
        )
        leader_ca = ca_path.read_text()
        for node in members[1:]:
            _wait(
                lambda n=node: n.health() is not None,
                f"{node.node_id} listening",
                deadline,
                cluster,
            )
            _post(
                node,
                "sys/storage/raft/join",
                {"leader_api_addr": first.address, "leader_ca_cert": leader_ca},
            )
            _post(node, "sys/unseal", {"key": cluster.unseal_key})
        for node in members[1:]:
            _wait(
                lambda n=node: n.health() == HEALTH_STANDBY,
                f"{node.node_id} standby",
                deadline,
                cluster,
            )
        _wait(lambda: len(cluster.voters()) == nodes, "all nodes voters", deadline, cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture
def bao_cluster() -> Iterator[BaoCluster]:
    """A fresh three-node Raft cluster for one test (stopping nodes is what it is for)."""
    base = Path(tempfile.mkdtemp(prefix="sidekey-bao-cluster-"))
    cluster = start_cluster(base)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
