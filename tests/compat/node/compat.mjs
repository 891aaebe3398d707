// The driver matrix's Node.js clients (tests/compat): node-postgres and undici through the
// broker, with the everyday features their users rely on.
//
//   node compat.mjs pg|undici
//
// Settings come from COMPAT_* environment variables (tests/compat/drivers.py); every feature
// prints one JSON line {"feature", "ok", "detail"}.
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import process from "node:process";

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
};
const report = (feature, error, detail = "") =>
  console.log(JSON.stringify({ feature, ok: !error, detail: error ? String(error.message ?? error) : detail }));

async function step(feature, fn) {
  try {
    report(feature, null, (await fn()) ?? "");
  } catch (error) {
    report(feature, error);
  }
}

function tls(certEnv, keyEnv) {
  return {
    ca: readFileSync(env("COMPAT_CA")),
    cert: readFileSync(env(certEnv)),
    key: readFileSync(env(keyEnv)),
    servername: "localhost",
  };
}

async function runPg() {
  const pg = (await import("pg")).default;
  const config = (certEnv, keyEnv) => ({
    host: env("COMPAT_HOST"),
    port: Number(env("COMPAT_PORT")),
    database: "appdb",
    user: "ignored",
    ssl: { ...tls(certEnv, keyEnv), rejectUnauthorized: true },
    statement_timeout: 0,
  });
  const client = new pg.Client(config("COMPAT_CERT", "COMPAT_KEY"));
  try {
    await client.connect();
    report("connect", null);
  } catch (error) {
    report("connect", error);
    return;
  }
  await step("prepared", async () => {
    const res = await client.query({ name: "add", text: "SELECT $1::int + $2::int AS n", values: [40, 2] });
    if (res.rows[0].n !== 42) throw new Error(`prepared statement gave ${res.rows[0].n}`);
  });
  await step("transaction", async () => {
    await client.query("CREATE TEMP TABLE compat (n int, s text)");
    await client.query("BEGIN");
    await client.query("INSERT INTO compat VALUES (1, 'rolled back')");
    await client.query("ROLLBACK");
    const res = await client.query("SELECT count(*)::int AS n FROM compat");
    if (res.rows[0].n !== 0) throw new Error("the rolled back row is there");
  });
  await step("bulk_insert", async () => {
    const res = await client.query(
      "INSERT INTO compat SELECT n, 'row ' || n FROM unnest($1::int[]) n",
      [Array.from({ length: 1000 }, (_, i) => i)],
    );
    if (res.rowCount !== 1000) throw new Error(`inserted ${res.rowCount} rows`);
  });
  await step("listen_notify", async () => {
    const heard = new Promise((resolve) => client.once("notification", resolve));
    await client.query("LISTEN compat");
    await client.query("NOTIFY compat, 'hello'");
    const message = await heard;
    const pid = (await client.query("SELECT pg_backend_pid() AS pid")).rows[0].pid;
    if (message.payload !== "hello" || message.processId !== pid || client.processID !== pid)
      throw new Error(`notification from ${message.processId}, server pid ${pid}, driver pid ${client.processID}`);
  });
  await step("timeout", async () => {
    // node-postgres has no cancel of its own: statement_timeout, as its users set it.
    await client.query("SET statement_timeout = 500");
    try {
      await client.query("SELECT pg_sleep(20)");
    } catch (error) {
      await client.query("RESET statement_timeout");
      return error.message;
    }
    throw new Error("pg_sleep(20) was not cut short");
  });
  await step("large_result", async () => {
    const res = await client.query("SELECT g, repeat('x', 100) AS s FROM generate_series(1, 100000) g");
    if (res.rows.length !== 100000) throw new Error(`large result had ${res.rows.length} rows`);
  });
  await client.end();
  const denied = new pg.Client(config("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY"));
  try {
    await denied.connect();
    await denied.end();
    report("denied", new Error("the denied identity connected"));
  } catch (error) {
    report("denied", null, error.message);
  }
}

async function runUndici() {
  const { Agent, request } = await import("undici");
  const base = env("COMPAT_URL");
  const agent = new Agent({ connect: tls("COMPAT_CERT", "COMPAT_KEY") });
  await step("get", async () => {
    const res = await request(`${base}/compat/get`, { dispatcher: agent });
    const body = await res.body.text();
    if (res.statusCode !== 200 || !body.includes("/compat/get")) throw new Error(`${res.statusCode} ${body}`);
  });
  await step("post", async () => {
    const res = await request(`${base}/compat/post`, {
      dispatcher: agent, method: "POST", body: '{"n": 42}', headers: { "content-type": "application/json" },
    });
    const body = await res.body.text();
    if (res.statusCode !== 200 || !body.includes('{\\"n\\": 42}')) throw new Error(`${res.statusCode} ${body}`);
  });
  await step("large_result", async () => {
    const res = await request(`${base}/download?size=10000000`, { dispatcher: agent });
    const digest = createHash("sha256");
    for await (const chunk of res.body) digest.update(chunk);
    if (res.statusCode !== 200) throw new Error(`status ${res.statusCode}`);
    return digest.digest("hex");
  });
  await agent.close();
  const denied = new Agent({ connect: tls("COMPAT_DENIED_CERT", "COMPAT_DENIED_KEY") });
  await step("denied", async () => {
    const res = await request(`${base}/compat/denied`, { dispatcher: denied });
    const body = await res.body.text();
    if (res.statusCode !== 403) throw new Error(`status ${res.statusCode}`);
    return body;
  });
  await denied.close();
}

const which = process.argv[2];
if (which === "pg") await runPg();
else if (which === "undici") await runUndici();
else {
  console.error("usage: node compat.mjs pg|undici");
  process.exit(2);
}
