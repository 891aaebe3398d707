"""Every driver of the matrix: how its users point it at the broker, and what the matrix
checks through it. One table, read twice: the matrix's tests format these settings with the
test's own paths and connect with exactly that, and scripts/drivers_doc.py writes
docs/drivers.md from it (test_drivers_doc.py fails when the page is stale).

Placeholders: {host} {port} the broker's listener, {cert} {key} the workload's X.509-SVID
and key (PEM), {key_der} the same key as PKCS#8 DER (what Java takes), {ca} the trust bundle,
{url} https://{host}:{port}.
"""

from __future__ import annotations

from dataclasses import dataclass

# What each feature means, in the words of the page.
FEATURES = {
    "connect": "connect",
    "prepared": "prepared statement",
    "transaction": "transaction rolled back",
    "copy": "COPY FROM STDIN",
    "bulk_insert": "bulk insert (1000 rows)",
    "listen_notify": "LISTEN/NOTIFY (sender PID = own PID)",
    "pubsub": "SUBSCRIBE/PUBLISH",
    "get_set": "SET/GET",
    "cancel": "cancel (CancelRequest)",
    "timeout": "timeout",
    "large_result": "large result (100,000 rows / 5-10 MB)",
    "get": "GET",
    "post": "POST with a body",
    "denied": "a denied identity's error text",
    "migrate": "migrate twice across a lease revocation",
}

PG = (
    "connect",
    "prepared",
    "transaction",
    "copy",
    "listen_notify",
    "cancel",
    "large_result",
    "denied",
)


@dataclass(frozen=True, slots=True)
class Driver:
    name: str
    protocol: str  # PostgreSQL | HTTP | MySQL | Redis
    language: str
    settings: str
    features: tuple[str, ...]
    note: str = ""


DRIVERS = [
    # ------------------------------------------------------------------ PostgreSQL
    Driver(
        "psql",
        "PostgreSQL",
        "CLI (libpq 15)",
        "psql 'host={host} port={port} dbname=appdb sslmode=verify-full sslrootcert={ca} "
        "sslcert={cert} sslkey={key}'",
        (
            "connect",
            "prepared",
            "transaction",
            "copy",
            "listen_notify",
            "timeout",
            "large_result",
            "denied",
        ),
        "any user name; `require_auth=none` (libpq 16+) to refuse a password prompt",
    ),
    Driver(
        "asyncpg",
        "PostgreSQL",
        "Python",
        "ssl = ssl.create_default_context(cafile='{ca}'); "
        "ssl.load_cert_chain('{cert}', '{key}'); "
        "asyncpg.connect(host='{host}', port={port}, user='any', database='appdb', ssl=ssl)",
        PG,
    ),
    Driver(
        "psycopg 3",
        "PostgreSQL",
        "Python (libpq 18)",
        "psycopg.connect('host={host} port={port} dbname=appdb sslmode=verify-full "
        "sslrootcert={ca} sslcert={cert} sslkey={key}')",
        PG,
        "also with `sslnegotiation=direct`",
    ),
    Driver(
        "psycopg2",
        "PostgreSQL",
        "Python (libpq 17)",
        "psycopg2.connect('host={host} port={port} dbname=appdb sslmode=verify-full "
        "sslrootcert={ca} sslcert={cert} sslkey={key}')",
        (
            "connect",
            "prepared",
            "transaction",
            "copy",
            "listen_notify",
            "cancel",
            "timeout",
            "large_result",
            "denied",
        ),
    ),
    Driver(
        "SQLAlchemy + psycopg",
        "PostgreSQL",
        "Python",
        "create_engine('postgresql+psycopg://any@{host}:{port}/appdb?sslmode=verify-full"
        "&sslrootcert={ca}&sslcert={cert}&sslkey={key}')",
        ("connect", "prepared", "transaction", "bulk_insert", "large_result", "denied"),
    ),
    Driver(
        "SQLAlchemy + asyncpg",
        "PostgreSQL",
        "Python",
        "create_async_engine('postgresql+asyncpg://any@{host}:{port}/appdb', "
        "connect_args={{'ssl': ssl}}) with the asyncpg context above",
        ("connect", "prepared", "transaction", "bulk_insert", "large_result", "denied"),
    ),
    Driver(
        "Django",
        "PostgreSQL",
        "Python (psycopg 3)",
        "DATABASES['default'] = {{'ENGINE': 'django.db.backends.postgresql', 'HOST': '{host}', "
        "'PORT': '{port}', 'NAME': 'appdb', 'USER': 'any', 'OPTIONS': {{'sslmode': "
        "'verify-full', 'sslrootcert': '{ca}', 'sslcert': '{cert}', 'sslkey': '{key}'}}}}",
        ("migrate",),
        "with `upstream.set_role` (docs/adapters/postgres.md) so tables outlive the lease",
    ),
    Driver(
        "node-postgres (pg)",
        "PostgreSQL",
        "Node.js",
        "new pg.Client({{host: '{host}', port: {port}, database: 'appdb', user: 'any', "
        "ssl: {{ca, cert, key}}}}) with the files read by fs.readFileSync",
        (
            "connect",
            "prepared",
            "transaction",
            "bulk_insert",
            "listen_notify",
            "timeout",
            "large_result",
            "denied",
        ),
        "no driver-side cancel: `statement_timeout`",
    ),
    Driver(
        "pgx",
        "PostgreSQL",
        "Go",
        "pgx.Connect(ctx, 'host={host} port={port} dbname=appdb user=any sslmode=verify-full "
        "sslrootcert={ca} sslcert={cert} sslkey={key}')",
        PG,
    ),
    Driver(
        "pgjdbc",
        "PostgreSQL",
        "Java",
        "jdbc:postgresql://{host}:{port}/appdb?user=any&sslmode=verify-full&sslrootcert={ca}"
        "&sslcert={cert}&sslkey={key_der}",
        PG,
        "the key as PKCS#8 DER: `openssl pkcs8 -topk8 -nocrypt -outform DER`",
    ),
    # ------------------------------------------------------------------ HTTP
    Driver(
        "curl",
        "HTTP",
        "CLI",
        "curl --cert {cert} --key {key} --cacert {ca} {url}/...",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "requests",
        "HTTP",
        "Python",
        "requests.get('{url}/...', cert=('{cert}', '{key}'), verify='{ca}')",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "httpx",
        "HTTP",
        "Python",
        "ssl = ssl.create_default_context(cafile='{ca}'); ssl.load_cert_chain('{cert}', '{key}'); "
        "httpx.Client(verify=ssl)",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "aiohttp",
        "HTTP",
        "Python",
        "aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl)) with the context above",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "undici",
        "HTTP",
        "Node.js",
        "new Agent({{connect: {{ca, cert, key}}}}); request('{url}/...', {{dispatcher}})",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "net/http",
        "HTTP",
        "Go",
        "&http.Transport{{TLSClientConfig: &tls.Config{{Certificates: "
        "[tls.LoadX509KeyPair('{cert}', '{key}')], RootCAs: pool of '{ca}'}}}}",
        ("get", "post", "large_result", "denied"),
    ),
    Driver(
        "HttpClient",
        "HTTP",
        "Java",
        "HttpClient.newBuilder().sslContext(ctx): a KeyManager from '{cert}' + '{key_der}', "
        "a TrustManager from '{ca}'",
        ("get", "post", "large_result", "denied"),
        "the key as PKCS#8 DER, as for pgjdbc",
    ),
    # ------------------------------------------------------------------ MySQL
    Driver(
        "mysql CLI",
        "MySQL",
        "CLI (MariaDB)",
        "mysql -h {host} -P {port} -u any -D appdb --ssl-ca={ca} --ssl-cert={cert} "
        "--ssl-key={key} --ssl-verify-server-cert",
        ("connect", "prepared", "transaction", "bulk_insert", "large_result", "denied"),
    ),
    Driver(
        "PyMySQL",
        "MySQL",
        "Python",
        "pymysql.connect(host='{host}', port={port}, user='any', database='appdb', "
        "ssl={{'ca': '{ca}', 'cert': '{cert}', 'key': '{key}'}})",
        ("connect", "prepared", "transaction", "bulk_insert", "timeout", "large_result", "denied"),
    ),
    Driver(
        "go-sql-driver/mysql",
        "MySQL",
        "Go",
        "mysql.RegisterTLSConfig('sidekey', tlsConfig); sql.Open('mysql', "
        "'any@tcp({host}:{port})/appdb?tls=sidekey')",
        ("connect", "prepared", "transaction", "bulk_insert", "timeout", "large_result", "denied"),
    ),
    # ------------------------------------------------------------------ Redis
    Driver(
        "redis-cli",
        "Redis",
        "CLI",
        "redis-cli -h {host} -p {port} --tls --cert {cert} --key {key} --cacert {ca}",
        ("connect", "get_set", "transaction", "bulk_insert", "large_result", "denied"),
    ),
    Driver(
        "redis-py",
        "Redis",
        "Python",
        "redis.Redis(host='{host}', port={port}, ssl=True, ssl_certfile='{cert}', "
        "ssl_keyfile='{key}', ssl_ca_certs='{ca}')",
        (
            "connect",
            "get_set",
            "transaction",
            "bulk_insert",
            "pubsub",
            "timeout",
            "large_result",
            "denied",
        ),
    ),
    Driver(
        "go-redis",
        "Redis",
        "Go",
        "redis.NewClient(&redis.Options{{Addr: '{host}:{port}', TLSConfig: tlsConfig}})",
        (
            "connect",
            "get_set",
            "transaction",
            "bulk_insert",
            "pubsub",
            "timeout",
            "large_result",
            "denied",
        ),
    ),
]

BY_NAME = {d.name: d for d in DRIVERS}


def settings(name: str, **values: object) -> str:
    """The settings of driver `name` filled in with a test's own values."""
    return BY_NAME[name].settings.format(**values)
