"""Write docs/drivers.md from the driver matrix's table (tests/compat/drivers.py): the same
settings the matrix connects with, and the features it checks through each driver.

    .venv/bin/python scripts/drivers_doc.py          # rewrite docs/drivers.md
    .venv/bin/python scripts/drivers_doc.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.compat.drivers import DRIVERS, FEATURES  # noqa: E402 - after the path

PAGE = REPO / "docs" / "drivers.md"
# What the page shows for the placeholders: the names the README's examples use.
SHOWN = {
    "host": "localhost", "port": "15432", "cert": "svid.pem", "key": "svid-key.pem",
    "key_der": "svid-key.pk8", "ca": "bundle.pem", "url": "https://localhost:18443",
}  # fmt: skip
PORTS = {"PostgreSQL": "15432", "HTTP": "18443", "MySQL": "13306", "Redis": "16380"}

HEAD = """# Drivers

Every driver below is run through the broker by the driver matrix (`tests/compat/`, part of
`make test`) with exactly the settings shown: the workload's X.509-SVID (`svid.pem`,
`svid-key.pem`) is its only credential, `bundle.pem` verifies the broker. The user name and
password a driver sends are ignored: the broker logs in upstream with a just-in-time
credential. This page is written by `scripts/drivers_doc.py` from `tests/compat/drivers.py`;
edit that, not this.

Common to every PostgreSQL client: verify the broker (`sslmode=verify-full`), present the
SVID (`sslcert`/`sslkey`), and, with libpq 16+, `require_auth=none` (refuses a server that
asks for a password). `require_auth=scram-sha-256` and `channel_binding=require` cannot work:
the caller holds no password, so libpq fails with `authentication method requirement
"scram-sha-256" failed: server did not complete authentication` or `channel binding
required, but server authenticated client without channel binding`. libpq 17+
`sslnegotiation=direct` works (ALPN `postgresql`). A client without a certificate is told
`no client certificate: ...`; see [the PostgreSQL page](adapters/postgres.md).
"""


def versions() -> dict[str, str]:
    """Pinned versions of the Go, Node.js and Java drivers, from their manifests."""
    found: dict[str, str] = {}
    gomod = (REPO / "tests/compat/go/go.mod").read_text()
    for module, name in (("jackc/pgx/v5", "pgx"), ("go-sql-driver/mysql", "go-sql-driver/mysql"),
                         ("redis/go-redis/v9", "go-redis")):  # fmt: skip
        match = re.search(rf"{re.escape(module)} (v\S+)", gomod)
        if match:
            found[name] = match.group(1)
    node = json.loads((REPO / "tests/compat/node/package.json").read_text())["dependencies"]
    found["node-postgres (pg)"] = node["pg"]
    found["undici"] = node["undici"]
    pom = (REPO / "tests/compat/java/pom.xml").read_text()
    match = re.search(r"<artifactId>postgresql</artifactId>\s*<version>([^<]+)<", pom)
    if match:
        found["pgjdbc"] = match.group(1)
    return found


def render() -> str:
    pinned = versions()
    out = [HEAD]
    for protocol in ("PostgreSQL", "HTTP", "MySQL", "Redis"):
        out.append(f"\n## {protocol}\n")
        out.append("| driver | language | settings | checked through the broker |")
        out.append("|---|---|---|---|")
        for d in (d for d in DRIVERS if d.protocol == protocol):
            shown = {**SHOWN, "port": PORTS[protocol]}
            setting = d.settings.format(**shown).replace("|", "\\|")
            name = f"{d.name} {pinned[d.name]}" if d.name in pinned else d.name
            features = ", ".join(FEATURES[f] for f in d.features)
            note = f"<br>{d.note}" if d.note else ""
            out.append(f"| {name} | {d.language} | `{setting}`{note} | {features} |")
    return "\n".join(out) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/drivers.md is stale: run scripts/drivers_doc.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
