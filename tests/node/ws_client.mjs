// A WebSocket client on Node's `ws` (installed by scripts/install-node-ws.sh), driven by
// tests/test_http_websocket.py through the broker: one text echo, one ping answered by a pong,
// one 10 MB binary echo, then a close with code 4001. Prints one JSON line per step.
//   node ws_client.mjs <ws module dir> <wss url> <cert> <key> <ca>
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const [wsDir, url, cert, key, ca] = process.argv.slice(2);
const WebSocket = createRequire(`${wsDir}/`)("ws");
const say = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const sha256 = (buf) => createHash("sha256").update(buf).digest("hex");

const ws = new WebSocket(url, {
  cert: readFileSync(cert), key: readFileSync(key), ca: readFileSync(ca),
  maxPayload: 64 * 1024 * 1024, perMessageDeflate: false,
});
const next = (event) => new Promise((resolve) => ws.once(event, (...args) => resolve(args)));
const fail = (err) => { say({ step: "error", error: String(err) }); process.exit(1); };
ws.on("error", fail);
ws.on("unexpected-response", (_req, res) => {
  let body = "";
  res.on("data", (d) => { body += d; });
  res.on("end", () => { say({ step: "refused", status: res.statusCode, body }); process.exit(0); });
});

await next("open");
say({ step: "open" });
ws.send("hello from ws");
let [data, isBinary] = await next("message");
say({ step: "text", data: data.toString(), isBinary });
ws.ping(Buffer.from("are you there"));
const [pong] = await next("pong");
say({ step: "pong", data: pong.toString() });
const big = Buffer.alloc(10 * 1024 * 1024);
for (let i = 0; i < big.length; i += 4) big.writeUInt32LE(i, i);
ws.send(big);
[data, isBinary] = await next("message");
say({ step: "binary", size: data.length, sha256: sha256(data), sent: sha256(big), isBinary });
ws.close(4001, "bye");
const [code, reason] = await next("close");
say({ step: "close", code, reason: reason.toString() });
