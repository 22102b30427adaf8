// The proxy variant: plain node:http through the broker's API proxy on its
// Unix socket (socketPath), as the README shows, against a real
// `flute-token-broker serve --dev --proxy sandbox=unix:...`: no token in
// this code at all.
// Run with FLUTE_BROKER_BIN pointing at the built binary (.ci/run does this).

"use strict";

const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const http = require("node:http");
const os = require("node:os");
const path = require("node:path");
const readline = require("node:readline");
const { after, before, test } = require("node:test");

const BIN =
  process.env.FLUTE_BROKER_BIN || path.join(__dirname, "..", "..", "..", "target", "debug", "flute-token-broker");

/** One request through the proxy's socket: [status, parsed JSON body]. */
function call(socketPath, method, apiPath, body) {
  return new Promise((resolve, reject) => {
    const headers = body ? { "content-type": "application/json" } : {};
    const request = http.request({ socketPath, method, path: apiPath, headers }, (res) => {
      let text = "";
      res.on("data", (chunk) => (text += chunk));
      res.on("end", () => resolve([res.statusCode, JSON.parse(text)]));
    });
    request.on("error", reject);
    request.end(body ? JSON.stringify(body) : undefined);
  });
}

let proc;
let socketPath;
let emulator;

before(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flute-node-proxy-"));
  socketPath = path.join(dir, "sandbox-api.sock");
  proc = spawn(
    BIN,
    ["serve", "--dev", "--admin-listen", "", "--listen", `unix:${path.join(dir, "broker.sock")}`, "--proxy", `sandbox=unix:${socketPath}`],
    { stdio: ["ignore", "pipe", "ignore"] },
  );
  for await (const line of readline.createInterface({ input: proc.stdout })) {
    if (line.trim().startsWith("emulator:")) emulator = line.trim().split(/\s+/)[1];
    if (line.startsWith("Stop with")) break;
  }
  assert.ok(emulator && fs.existsSync(socketPath), "serve --dev printed its banner and opened the proxy socket");
});

after(() => proc.kill("SIGTERM"));

test("a GET and a JSON POST reach the API with a token this code never held", async () => {
  const [status, listed] = await call(socketPath, "GET", "/v2/transactions");
  assert.equal(status, 200);
  assert.ok(listed.transactions.length > 0);
  const [posted, echo] = await call(socketPath, "POST", "/v2/payments", { amount: 1250, currency: "USD" });
  assert.equal(posted, 200);
  assert.equal(echo.method, "POST");
  assert.equal(echo.token_id.length, 12);
  assert.ok(!("authorization" in echo.headers), "the API echo never shows the token");
});

test("a token revoked by the API is replaced without the caller seeing a 401", async () => {
  const [, before] = await call(socketPath, "POST", "/v2/payments", { n: 1 });
  const revoked = await new Promise((resolve, reject) => {
    const request = http.request(`${emulator}/__emulator/faults`, { method: "POST", headers: { "content-type": "application/json" } }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    request.on("error", reject);
    // This emulator serves both environments: revoke the sandbox token by its id.
    request.end(JSON.stringify({ revoke_token_id: before.token_id }));
  });
  assert.equal(revoked, 200);
  const [status, after] = await call(socketPath, "POST", "/v2/payments", { n: 2 });
  assert.equal(status, 200);
  assert.notEqual(after.token_id, before.token_id);
});
