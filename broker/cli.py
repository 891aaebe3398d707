"""The `sidekey` command: run, check, reload, and the development CA."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import glob
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from broker import __version__
from broker.config import DEFAULT_DRAIN_SECONDS, Config, load_config
from broker.errors import SidekeyError

if TYPE_CHECKING:
    from broker.runtime import Broker
    from broker.session.siblings import Siblings

log = logging.getLogger("sidekey")

# A reload builds services and re-reads files: well under a second; this bounds a stuck one.
RELOAD_TIMEOUT_SECONDS = 60.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line on stderr, so log shippers need no parsing rules."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = f" worker={worker}" if worker is not None else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{who} %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A library's warning becomes a log line (logger py.warnings), not raw text on stderr.
    logging.captureWarnings(True)
    # aiohttp's access log would record paths and query strings; our audit trail is the record.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidekey", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sidekey {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the broker in the foreground")
    run.add_argument("--config", required=True, type=Path)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="json", choices=["json", "text"])
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_SECONDS,
        help="seconds in-flight work gets to finish on SIGTERM/SIGINT",
    )
    # Set by the parent of `workers: N` (broker.supervisor) for each worker it starts.
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-admin", type=Path, help=argparse.SUPPRESS)
    run.add_argument("--worker-sockets", help=argparse.SUPPRESS)
    run.add_argument("--worker-parent-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-journal", type=Path, help=argparse.SUPPRESS)
    run.add_argument("--worker-adopt", type=json.loads, default=[], help=argparse.SUPPRESS)
    run.add_argument("--worker-siblings", help=argparse.SUPPRESS)

    check = sub.add_parser("check", help="validate a config and every file it references")
    check.add_argument("--config", required=True, type=Path)

    reload = sub.add_parser(
        "reload", help="check a config, then have the running broker apply it (as SIGHUP)"
    )
    reload.add_argument("--config", required=True, type=Path)
    reload.add_argument("--admin", help="the broker's admin address (default: admin.listen)")
    reload.add_argument("--pid", type=int, help="send SIGHUP to this process instead")

    offboard = sub.add_parser(
        "offboard", help="deny an identity on every broker now, close its sessions, revoke leases"
    )
    offboard.add_argument("--config", required=True, type=Path)
    offboard.add_argument("spiffe_id")
    offboard.add_argument("--reason", required=True, help="why (kept in the audit trail)")
    onboard = sub.add_parser("onboard", help="lift an offboarding: remove the deny-list entry")
    onboard.add_argument("--config", required=True, type=Path)
    onboard.add_argument("spiffe_id")

    explain = sub.add_parser("explain", help="why an identity may (not) use a service")
    explain.add_argument("--config", required=True, type=Path)
    explain.add_argument("--identity", required=True, help="a SPIFFE ID")
    explain.add_argument("--service", required=True)
    explain.add_argument("--at", help="a time (ISO 8601, e.g. 2026-11-30T14:00Z); default now")
    explain.add_argument("--from", dest="source", help="the caller's address (10.1.2.3)")
    explain.add_argument("--claims", help="the caller's JWT/OIDC claims as a JSON object")
    explain.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="work with audit trails")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check a trail's hash chain; say where it breaks")
    verify.add_argument("paths", nargs="+", type=Path, help="files, oldest first (or globs)")

    access = sub.add_parser("access", help="who could reach what, and who did, at a time")
    access.add_argument("--audit", required=True, nargs="+", type=Path,
                        help="audit trails (files or globs): every broker's")  # fmt: skip
    access.add_argument("--at", help="the time (ISO 8601, e.g. 2026-11-30T14:00Z)")
    access.add_argument("--since", help="a window's start instead of --at")
    access.add_argument("--until", help="a window's end (default: --since)")
    access.add_argument("--identity", help="only this SPIFFE ID")
    access.add_argument("--service", help="only this service")
    access.add_argument("--json", action="store_true")

    for name, text in (
        ("inventory", "every identity, its owner, what it may reach"),
        ("posture", "findings mapped to the OWASP Non-Human Identities Top 10"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, type=Path)
        p.add_argument(
            "--audit",
            nargs="*",
            type=Path,
            default=[],
            help="audit trails (files or globs) for use: first/last, calls, hosts",
        )
        p.add_argument("--stale-days", type=int, default=30)
        p.add_argument("--json", action="store_true")
        if name == "posture":
            p.add_argument("--secret-max-days", type=int, default=90)
            p.add_argument("--max-hosts", type=int, default=20)
            p.add_argument(
                "--fail-on",
                choices=["low", "medium", "high"],
                default="high",
                help="exit 1 when a finding is at least this severe (CI gate)",
            )

    ca = sub.add_parser("ca", help="a development-only SPIFFE CA (never for production)")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create a CA and trust bundle in DIR")
    init.add_argument("--dir", required=True, type=Path)
    init.add_argument("--trust-domain", required=True)
    issue = ca_sub.add_parser("issue", help="issue an X.509-SVID from the CA in DIR")
    issue.add_argument("--dir", required=True, type=Path)
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    issue.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    issue.add_argument("--out", required=True, type=Path, help="writes OUT.pem, OUT-key.pem")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            setup_logging(args.log_level, args.log_format, worker=args.worker)
            if args.worker is not None:
                return run_worker(args)
            return run(args.config, args.drain_timeout, [
                "--log-level", args.log_level, "--log-format", args.log_format])  # fmt: skip
        if args.command == "check":
            return check(args.config)
        if args.command == "reload":
            return reload_command(args)
        if args.command == "audit":
            return audit_verify(args.paths)
        if args.command in ("inventory", "posture"):
            return asyncio.run(governance_command(args))
        if args.command == "access":
            return access_command(args)
        if args.command == "explain":
            return explain_command(args)
        if args.command in ("offboard", "onboard"):
            return asyncio.run(deny_list_command(args))
        return ca_command(args)
    except SidekeyError as exc:
        print(f"sidekey: {exc}", file=sys.stderr)
        return 2


def check(path: Path) -> int:
    from broker.governance.posture import local_warnings, unowned_rules  # noqa: PLC0415

    config = validate(path)
    print(f"{path}: ok ({len(config.services)} services)")
    for warning in unowned_rules(config) + local_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


async def secret_ages(config: Config) -> dict[str, float]:
    """Days since each vault-kv service's current version was written (vault metadata)."""
    from broker.credentials.vault import VaultClient  # noqa: PLC0415

    kv = [s for s in config.services if s.credentials.provider == "vault-kv"]
    if config.vault is None or not kv:
        return {}
    vault = VaultClient.from_config(config.vault)
    ages: dict[str, float] = {}
    try:
        for svc in kv:
            try:
                found = await vault.read_kv_optional(svc.credentials.mount,
                                                     svc.credentials.path or "")  # fmt: skip
            except SidekeyError as exc:
                print(f"warning: {svc.name}: cannot read the secret's age: {exc}", file=sys.stderr)
                continue
            if found is not None and found[2]:
                written = datetime.fromisoformat(found[2].replace("Z", "+00:00")[:26] + "+00:00")
                ages[svc.name] = (datetime.now(UTC) - written).total_seconds() / 86400
    finally:
        await vault.close()
    return ages


async def governance_command(args: argparse.Namespace) -> int:
    from broker.governance import posture as gov  # noqa: PLC0415
    from broker.governance.access import usage_from_trails  # noqa: PLC0415

    config = load_config(args.config)
    now = datetime.now(UTC)
    files = expand(args.audit) if args.audit else []
    usage = usage_from_trails(files, now) if files else {}
    ages = await secret_ages(config)
    if args.command == "inventory":
        inv = gov.inventory(config, usage, now=now, secret_ages=ages, stale_days=args.stale_days)
        if args.json:
            print(json.dumps(inv, indent=2))
            return 0
        for ident in inv["identities"]:
            flags = " [STALE]" * ident["stale"] + " [EXPIRED]" * ident["expired"]
            print(f"{ident['id']}  owner={ident['owner'] or '-'}{flags}")
            for s in ident["services"]:
                cred = s["credential"]
                last = s["last_use"] or "never"
                print(f"    {s['service']:<20} {cred['kind']:<8} {cred['ref']}  "
                      f"last use {last}, {s['calls_24h']} calls/24h")  # fmt: skip
        return 0
    findings = gov.posture(config, usage, now=now, secret_ages=ages, stale_days=args.stale_days,
                           secret_max_days=args.secret_max_days, max_hosts=args.max_hosts,
                           have_usage=bool(files))  # fmt: skip
    threshold = gov.SEVERITIES.index(args.fail_on)
    failing = [f for f in findings if gov.SEVERITIES.index(f.severity) >= threshold]
    if args.json:
        print(json.dumps({"findings": [f.to_json() for f in findings],
                          "fail_on": args.fail_on, "failing": len(failing)}, indent=2))  # fmt: skip
    else:
        for f in findings:
            print(f"{f.id} {f.title} [{f.severity}] {f.subject}: {f.evidence}")
        print(f"{len(findings)} findings, {len(failing)} at or above {args.fail_on}")
    return 1 if failing else 0


def validate(path: Path) -> Config:
    """Parse a config and build everything from it that can fail without IO; raises
    ConfigError. What `check` reports, and what a reload refuses."""
    from broker.runtime import Broker  # noqa: PLC0415

    config = load_config(path)
    Broker(config)  # builds TLS contexts, credential sources and adapters: validates all
    return config


def reload_command(args: argparse.Namespace) -> int:
    """Refuse a broken config here, as the broker would; then ask the broker to reload."""
    config = validate(args.config)
    if args.pid is not None:
        os.kill(args.pid, signal.SIGHUP)
        print(f"sent SIGHUP to {args.pid}; the broker logs the outcome")
        return 0
    address = args.admin
    if address is None:
        admin = config.admin
        if admin is None or admin.listen.port in (None, 0):
            raise SidekeyError(
                "no fixed admin.listen in the config: pass --admin HOST:PORT, or --pid PID "
                "to send SIGHUP"
            )
        address = str(admin.listen)
    request = urllib.request.Request(f"http://{address}/reload", method="POST", data=b"")
    try:
        # An http:// URL built here from the admin address, never from input.
        with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT_SECONDS) as response:  # noqa: S310
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, OSError) as exc:
        raise SidekeyError(f"cannot reach the broker's admin server at {address}: {exc}") from None
    if not body.get("ok"):
        print(f"sidekey: reload refused: {body.get('error')}", file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2))
    return 0


async def deny_list_command(args: argparse.Namespace) -> int:
    """`offboard` / `onboard`: write the shared deny list with the config's vault login."""
    from spiffe import SpiffeId  # noqa: PLC0415

    from broker import control  # noqa: PLC0415
    from broker.credentials.vault import VaultClient  # noqa: PLC0415

    config = load_config(args.config)
    deny = config.governance.deny_list
    if config.vault is None or not deny.enabled:
        raise SidekeyError(
            f"{args.config}: no deny list to write: it needs a vault section and "
            "governance.deny_list not set to false"
        )
    try:
        SpiffeId(args.spiffe_id)
    except Exception:
        raise SidekeyError(f"not a valid SPIFFE ID: {args.spiffe_id!r}") from None
    vault = VaultClient.from_config(config.vault)
    where = f"{deny.mount}/{deny.path}"
    try:
        if args.command == "offboard":
            entry = await control.add_entry(vault, deny, args.spiffe_id, args.reason)
            print(
                f"offboarded {entry.spiffe_id} in {where} (by {entry.by} at {entry.at}); every "
                f"broker denies it within {config.governance.watch_interval:g}s, closes its "
                "sessions and revokes its leases"
            )
        elif await control.remove_entry(vault, deny, args.spiffe_id):
            print(f"onboarded {args.spiffe_id}: removed from {where}")
        else:
            print(f"{args.spiffe_id} is not on the deny list {where}")
    finally:
        await vault.close()
    return 0


def expand(paths: Sequence[Path]) -> list[Path]:
    """Paths and globs, each glob's matches sorted (rotated files then read oldest first
    when named audit.jsonl.1, audit.jsonl.2 ... newest last by the caller's order)."""
    found: list[Path] = []
    for path in paths:
        text = str(path)
        if any(c in text for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise SidekeyError(f"{text}: no file matches")
            found.extend(matches)
        elif not path.is_file():
            raise SidekeyError(f"{path}: no such file")
        else:
            found.append(path)
    return found


def audit_verify(paths: Sequence[Path]) -> int:
    from broker.governance.verify import verify  # noqa: PLC0415

    files = expand(paths)
    report = verify(files)
    for problem in report.problems:
        print(problem)
    if report.more:
        print(f"... and {report.more} more problems")
    state = "intact" if report.ok else f"BROKEN ({len(report.problems) + report.more} problems)"
    print(
        f"{report.lines} lines in {len(files)} files: chain {state}; last seq {report.last_seq}"
        f" hash {report.last_hash or '-'} (compare it with a copy kept elsewhere: a chain "
        "cannot show lines cut from its end)"
    )
    return 0 if report.ok else 1


def access_command(args: argparse.Namespace) -> int:
    from broker.governance.access import access  # noqa: PLC0415

    if (args.at is None) == (args.since is None):
        raise SidekeyError("give --at T, or a window with --since T1 [--until T2]")
    since = parse_time(args.at or args.since)
    until = parse_time(args.until) if args.until else since
    result = access(expand(args.audit), since, until, identity=args.identity,
                    service=args.service)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    window = result["since"] if since == until else f"{result['since']} - {result['until']}"
    print(f"could reach at {result['until']} (policy in force then):")
    for row in result["could_reach"]:
        who = ", ".join(row["identities"]) or "(no identity seen in the trails)"
        cond = f" when {json.dumps(row['conditions'])}" if row["conditions"] else ""
        off = f"; offboarded: {', '.join(row['offboarded'])}" if row["offboarded"] else ""
        trail = row["trail"]
        print(f"  {row['service']:<20} rule {row['rule']}{cond}: {who}{off}  [{trail}]")
    print(f"did reach during {window}:")
    for row in result["did_reach"]:
        user = f" as {row['upstream_user']}" if "upstream_user" in row else ""
        lease = f" lease {row['lease_id']}" if "lease_id" in row else ""
        span = f"{row['began']} - {row.get('ended', '(open)')}"
        print(f"  {span} {row['kind']} {row['spiffe_id']} -> {row['service']}{user}{lease} "
              f"from {row.get('peer')}")  # fmt: skip
    return 0


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; `Z` and a missing zone both mean UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SidekeyError(f"not a time: {text!r} (ISO 8601, e.g. 2026-11-30T14:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def explain_command(args: argparse.Namespace) -> int:
    from broker.policy import Context, explain  # noqa: PLC0415

    config = load_config(args.config)
    service = next((s for s in config.services if s.name == args.service), None)
    if service is None:
        names = ", ".join(s.name for s in config.services)
        raise SidekeyError(f"no service {args.service!r} in {args.config} (services: {names})")
    claims = None
    if args.claims:
        try:
            claims = json.loads(args.claims)
        except ValueError:
            raise SidekeyError("--claims: not JSON") from None
        if not isinstance(claims, dict):
            raise SidekeyError("--claims: must be a JSON object")
    context = Context(at=parse_time(args.at) if args.at else None, source=args.source)
    result = explain(args.identity, service, claims=claims, context=context).to_json()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['decision']}: {result['reason']}")
        if result["rule"]:
            print(f"  rule: {json.dumps(result['rule'])}")
        if "nearest" in result:
            print(f"  nearest rule: {json.dumps(result['nearest']['rule'])}")
            print(f"  why not: {result['nearest']['why_not']}")
    return 0 if result["decision"] == "allow" else 1


# glibc's malloc raises its mmap threshold to the largest block freed so far (up to 32 MiB):
# after the first TLS connection closes, every connection's 256 KiB TLS read buffer (the
# SSLProtocol of uvloop and of CPython) comes from the heap instead of a mapping of its own,
# freed buffers interleave with long-lived objects, and each page a buffer ever touched stays
# resident. Fixed at 128 KiB (glibc's default start) they are unmapped when the connection
# closes: 10 bursts of 150 PostgreSQL sessions (issue 19.3, TLS both legs) took RSS from 94
# to 109 MB with the dynamic threshold and from 92 to 97 MB with it fixed (heap 103 -> 29 MB).
# An mmap and munmap per buffer cost a few microseconds against a ~2 ms mutual-TLS handshake.
MALLOC_MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold (see MALLOC_MMAP_THRESHOLD) unless the operator set one
    (MALLOC_MMAP_THRESHOLD_); False where there is no glibc mallopt to call."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))


def run(path: Path, drain_timeout: float, log_args: list[str] | None = None) -> int:
    config = load_config(path)
    tune_malloc()
    count = config.worker_count
    if count > 1:
        from broker.supervisor import Supervisor  # noqa: PLC0415

        supervisor = Supervisor(
            config, count=count, drain_timeout=drain_timeout, log_args=log_args or []
        )
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
            return runner.run(supervisor.run())
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        return runner.run(_serve(config, drain_timeout))


def run_worker(args: argparse.Namespace) -> int:
    """One worker of `workers: N`, started by its parent (broker.supervisor): the broker of
    the same config on the sockets the parent bound, with a private admin socket."""
    import dataclasses  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from broker.config import AdminConfig, ListenAddress  # noqa: PLC0415
    from broker.session.siblings import Siblings  # noqa: PLC0415

    config = load_config(args.config)
    tune_malloc()
    config = dataclasses.replace(config, admin=AdminConfig(ListenAddress(path=args.worker_admin)))
    fds: dict[str, int] = json.loads(args.worker_sockets or "{}")
    sockets = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
    # Every worker's socket for its siblings' requests, in worker order (its own among them).
    paths = [Path(p) for p in json.loads(args.worker_siblings or "[]")]
    siblings = (
        Siblings(
            args.worker, paths[args.worker - 1], paths[: args.worker - 1] + paths[args.worker :]
        )
        if len(paths) > 1
        else None
    )
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        return runner.run(
            _serve(
                config, args.drain_timeout, worker=args.worker, sockets=sockets,
                parent_fd=args.worker_parent_fd, siblings=siblings,
                lease_journal=args.worker_journal,
                adopt_journals=[Path(p) for p in args.worker_adopt],
            )
        )  # fmt: skip


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `event_loop` names. auto: uvloop where installed (a dependency on
    Linux): it roughly halves the relay's CPU per byte. None is asyncio's own loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - not installed off Linux
    except ImportError:
        if choice == "uvloop":
            raise SidekeyError(
                "event_loop: uvloop is not installed (pip install uvloop, or event_loop: auto "
                "to use asyncio's loop where it is missing)"
            ) from None
        return None
    return uvloop.new_event_loop


async def _serve(
    config: Config,
    drain_timeout: float,
    *,
    worker: int | None = None,
    sockets: dict[str, socket.socket] | None = None,
    parent_fd: int | None = None,
    siblings: Siblings | None = None,
    lease_journal: Path | None = None,
    adopt_journals: list[Path] | None = None,
) -> int:
    from broker.observe.metrics import platform_info  # noqa: PLC0415
    from broker.runtime import Broker  # noqa: PLC0415

    broker: Broker = Broker(
        config, drain_timeout=drain_timeout, worker=worker, sockets=sockets or {},
        siblings=siblings, lease_journal=lease_journal, adopt_journals=adopt_journals or [],
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if parent_fd is not None:
        # The parent holds the write end and never writes: EOF means it is gone, and a
        # worker without its parent drains and exits like on SIGTERM.
        def parent_gone() -> None:
            loop.remove_reader(parent_fd)
            log.warning("the parent process is gone: stopping")
            stop.set()

        loop.add_reader(parent_fd, parent_gone)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload(broker))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    info = platform_info()
    log.info("event loop: %s (event_loop: %s)", info["event_loop"], config.event_loop)
    await broker.start()
    log.info(
        "sidekey %s running with %d services (Python %s, %s, %s)",
        __version__, len(config.services), info["python"], info["openssl"], info["event_loop"],
    )  # fmt: skip
    await stop.wait()
    log.info("signal received: draining for up to %.1fs", drain_timeout)
    loop.remove_signal_handler(signal.SIGHUP)
    await asyncio.gather(*reloads, return_exceptions=True)
    await broker.stop(drain_timeout)
    return 0


async def _reload(broker: Broker) -> None:
    log.info("SIGHUP: reloading %s", broker.config.path)
    try:
        await broker.reload()
    except SidekeyError as exc:
        log.error("reload refused, the running config stays: %s", exc)
    except Exception:
        log.exception("reload failed, the running config stays")


def ca_command(args: argparse.Namespace) -> int:
    from broker.identity import ca  # noqa: PLC0415 - only the CA commands need it

    if args.ca_command == "init":
        bundle = ca.init_ca(args.dir, args.trust_domain)
        print(f"CA for trust domain {args.trust_domain} in {args.dir}; trust bundle: {bundle}")
        print("development only: the CA key sits unencrypted on disk")
        return 0
    issued = ca.issue(args.dir, args.spiffe_id, args.out, dns=args.dns, ips=args.ip)
    print(f"issued {args.spiffe_id}: cert {issued.cert}, key {issued.key}, bundle {issued.bundle}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
