"""`make demo`: Sidekey end to end on real parts, then everything it started is stopped.

1. a development CA issues the broker's certificate and two workload SVIDs;
2. a real OpenBao dev server holds the demo API's token (KV v2) and a database secrets engine;
3. a small API that insists on that token, and a throwaway PostgreSQL cluster, start;
4. `sidekey run --config configs/demo.yaml` starts;
5. the `orders` workload calls the API and queries PostgreSQL through the broker with its
   certificate and no secret; an `intruder` workload is denied; the audit lines are shown.

The servers are the ones the test suite uses (tests/servers.py), on the ports configs/demo.yaml
names.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import (  # noqa: E402 - needs the repo root on sys.path
    configure_database,
    start_openbao,
    start_postgres,
    stop_postgres,
)

CONFIG = ROOT / "configs" / "demo.yaml"
RUN = ROOT / "demo" / "run"
CERTS = RUN / "certs"
TRUST_DOMAIN = "demo.sidekey.dev"
ORDERS = f"spiffe://{TRUST_DOMAIN}/ns/prod/sa/orders"
INTRUDER = f"spiffe://{TRUST_DOMAIN}/ns/dev/sa/intruder"
# The ports configs/demo.yaml names.
VAULT_PORT, API_PORT, BROKER_HTTP_PORT, BROKER_PG_PORT, PG_PORT, ADMIN_PORT = (
    18200, 18080, 18443, 15432, 15433, 19901,
)  # fmt: skip
# Every server here is up in a second or two; a loaded CI box gets generous slack.
READY_SECONDS = 60.0
POLL_SECONDS = 0.1


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    shown = " ".join(cmd).replace(str(ROOT) + "/", "")
    print(f"$ {shown}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    out = (result.stdout + result.stderr).strip()
    if out:
        print("  " + out.replace("\n", "\n  "), flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {result.returncode}")
    return result


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_http(url: str, what: str) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(POLL_SECONDS)
    raise SystemExit(f"demo: {what} did not become ready at {url}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    busy = [p for p in (VAULT_PORT, API_PORT, BROKER_HTTP_PORT, BROKER_PG_PORT, PG_PORT,
                        ADMIN_PORT) if not port_free(p)]  # fmt: skip
    if busy:
        raise SystemExit(f"demo: ports already in use on 127.0.0.1: {busy}; stop what uses them")
    shutil.rmtree(RUN, ignore_errors=True)
    CERTS.mkdir(parents=True)
    sidekey = str(Path(sys.executable).parent / "sidekey")

    with ExitStack() as stack:
        step("A development CA issues the broker's certificate and two workload SVIDs")
        run(sidekey, "ca", "init", "--dir", str(RUN / "ca"), "--trust-domain", TRUST_DOMAIN)
        shutil.copy(RUN / "ca" / "bundle.pem", CERTS / "bundle.pem")
        run(sidekey, "ca", "issue", "--dir", str(RUN / "ca"), "--spiffe-id",
            f"spiffe://{TRUST_DOMAIN}/sidekey", "--dns", "localhost", "--ip", "127.0.0.1",
            "--out", str(CERTS / "broker"))  # fmt: skip
        for spiffe_id, name in ((ORDERS, "orders"), (INTRUDER, "intruder")):
            run(sidekey, "ca", "issue", "--dir", str(RUN / "ca"), "--spiffe-id", spiffe_id,
                "--out", str(CERTS / name))  # fmt: skip

        step("OpenBao (dev server) holds the API token; the app never sees it")
        bao = start_openbao(RUN / "openbao", port=VAULT_PORT)
        stack.callback(bao.stop)
        (RUN / "vault-token").write_text(bao.token)
        (RUN / "vault-token").chmod(0o600)
        api_token = "demo-" + secrets.token_urlsafe(24)
        bao.client().secrets.kv.v2.create_or_update_secret(
            path="orders-api", secret={"token": api_token}
        )
        print(f"  stored secret/orders-api (token: {len(api_token)} characters, not shown)")

        step("A demo API that insists on that token, and a PostgreSQL cluster")
        token_file = RUN / "api-token"
        token_file.write_text(api_token)
        token_file.chmod(0o600)
        api = subprocess.Popen(
            [sys.executable, str(ROOT / "demo" / "api.py"), "--port", str(API_PORT),
             "--token-file", str(token_file)],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        stack.callback(stop_process, api)
        wait_http(f"http://127.0.0.1:{API_PORT}/healthz", "the demo API")
        pg_base = Path(tempfile.mkdtemp(prefix="sidekey-demo-pg-"))
        stack.callback(shutil.rmtree, pg_base, True)
        pg = start_postgres(pg_base, port=PG_PORT)
        stack.callback(stop_postgres, pg)
        vdb = configure_database(bao, pg)
        vdb.create_role("orders-rw", "1h", "24h")
        print(f"  PostgreSQL on 127.0.0.1:{PG_PORT}; OpenBao role orders-rw creates its users")

        step("Sidekey starts with configs/demo.yaml")
        run(sidekey, "check", "--config", str(CONFIG))
        broker_log = (RUN / "broker.log").open("wb")
        broker = subprocess.Popen(
            [sidekey, "run", "--config", str(CONFIG), "--log-format", "text"],
            stdin=subprocess.DEVNULL, stdout=broker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.callback(stop_process, broker)
        wait_http(f"http://127.0.0.1:{ADMIN_PORT}/readyz", "the broker")
        print(f"  ready: http://127.0.0.1:{ADMIN_PORT}/readyz")

        curl = ["curl", "-sS", "--cacert", str(CERTS / "bundle.pem"), "-w", "  HTTP %{http_code}\n"]
        url = f"https://localhost:{BROKER_HTTP_PORT}/orders"
        step("The orders workload calls the API through Sidekey with its certificate, no token")
        run(*curl, "--cert", str(CERTS / "orders.pem"), "--key", str(CERTS / "orders-key.pem"), url)

        step("The intruder workload has a valid SVID but no rule allows it: denied")
        run(*curl, "--cert", str(CERTS / "intruder.pem"), "--key",
            str(CERTS / "intruder-key.pem"), url)  # fmt: skip

        step("The orders workload queries PostgreSQL through Sidekey without a password")
        dsn = (
            f"host=localhost port={BROKER_PG_PORT} dbname=appdb user=orders sslmode=verify-full "
            f"sslrootcert={CERTS / 'bundle.pem'} sslcert={CERTS / 'orders.pem'} "
            f"sslkey={CERTS / 'orders-key.pem'}"
        )
        run("psql", "-X", dsn, "-c", "SELECT current_user AS database_user, now() AS at")
        step("The intruder gets a PostgreSQL error, not a session")
        run("psql", "-X", dsn.replace("orders", "intruder"), "-c", "SELECT 1", check=False)

        step("Audit trail (demo/run/audit.jsonl)")
        for line in (RUN / "audit.jsonl").read_text().splitlines():
            event = json.loads(line)
            shown = {k: event[k] for k in ("event", "service", "spiffe_id", "decision", "rule",
                                            "reason", "upstream_status", "upstream_user")
                     if k in event}  # fmt: skip
            print("  " + json.dumps(shown))

        step("Sidekey stops: drains, and revokes the database lease (the user is dropped)")
        stop_process(broker)
        users = pg.psql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'").strip()
        print(f"  dynamic database users left: {users}")
        if api_token in (RUN / "audit.jsonl").read_text() + (RUN / "broker.log").read_text():
            raise SystemExit("demo: the API token leaked into the audit trail or broker log")
        print("\nDemo done. Everything it started is stopped; files are in demo/run/.")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
