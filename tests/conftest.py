"""Shared fixtures: the dev PKI (tests/pki.py), real servers (tests/servers.py and, for MySQL
and Redis, tests/servers_mysql_redis.py; OpenBao with TLS in tests/openbao_tls.py, a
three-node OpenBao Raft cluster in tests/bao_cluster.py), real SPIRE (tests/spire.py), token
issuers (tests/tokens.py: the tests' own; tests/oidc.py: OpenBao's OIDC provider), a real
rsyslogd (tests/syslog.py), and the asyncio-and-uvloop runner of the connection-layer tests
(tests/loops.py)."""

pytest_plugins = [
    "tests.pki",
    "tests.servers",
    "tests.servers_mysql_redis",
    "tests.loops",
    "tests.spire",
    "tests.helm",
    "tests.image",
    "tests.tokens",
    "tests.oidc",
    "tests.oauth_server",
    "tests.moto_server",
    "tests.syslog",
    "tests.openbao_tls",
    "tests.bao_cluster",
]
