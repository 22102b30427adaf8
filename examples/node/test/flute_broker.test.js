// The Node client against a real `flute-token-broker serve --dev` process,
// over the Unix socket and over TCP, with @grpc/grpc-js default options.
// Run with FLUTE_BROKER_BIN pointing at the built binary (.ci/run does this).

"use strict";

const assert = require("node:assert/strict");
const { spawn } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");
const readline = require("node:readline");
const { after, before, describe, test } = require("node:test");
const grpc = require("@grpc/grpc-js");
const protobuf = require("protobufjs");

const { BrokerClient, BrokerError } = require("../flute_broker");

const BIN =
  process.env.FLUTE_BROKER_BIN || path.join(__dirname, "..", "..", "..", "target", "debug", "flute-token-broker");

/** Starts `serve --dev` (3 s tokens) on a Unix socket and a TCP port. */
async function startBroker() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flute-node-"));
  const sock = path.join(dir, "broker.sock");
  const proc = spawn(
    BIN,
    ["serve", "--dev", "--dev-token-lifetime", "3s", "--admin-listen", "", "--listen", `unix:${sock}`, "--listen", "127.0.0.1:0"],
    { stdio: ["ignore", "pipe", "ignore"] },
  );
  const lines = readline.createInterface({ input: proc.stdout });
  let emulator = null;
  let tcp = null;
  for await (const line of lines) {
    const fields = line.trim().split(/\s+/);
    if (line.trim().startsWith("emulator:")) emulator = fields[1];
    if (line.trim().startsWith("gRPC:")) tcp = fields[fields.length - 1];
    if (line.startsWith("Stop with")) break;
  }
  assert.ok(emulator && tcp, "serve --dev printed no emulator or gRPC address");
  return { proc, emulator, targets: { unix: `unix:${sock}`, tcp } };
}

// grpc.health.v1.Health/Check, called without generated code.
const health = protobuf.Root.fromJSON({
  nested: {
    Request: { fields: { service: { type: "string", id: 1 } } },
    Response: { fields: { status: { type: "int32", id: 1 } } },
  },
});
const HealthClient = grpc.makeGenericClientConstructor({
  Check: {
    path: "/grpc.health.v1.Health/Check",
    requestStream: false,
    responseStream: false,
    requestSerialize: (m) => Buffer.from(health.lookupType("Request").encode(m).finish()),
    responseDeserialize: (b) => health.lookupType("Response").decode(b),
  },
});
const SERVING = 1;

let broker;
before(async () => {
  broker = await startBroker();
});
after(async () => {
  broker.proc.kill("SIGTERM");
  const code = await new Promise((resolve) => broker.proc.on("exit", resolve));
  assert.equal(code, 0);
});

for (const transport of ["unix", "tcp"]) {
  describe(`over ${transport}`, () => {
    let client;
    before(() => {
      client = new BrokerClient(broker.targets[transport]);
    });
    after(() => client.close());

    test("GetToken, then an API call with it", async () => {
      const token = await client.getToken("sandbox");
      assert.equal(token.tokenType, "Bearer");
      assert.equal(token.tokenId.length, 12);
      const response = await client.authorizedGet(`${broker.emulator}/v2/transactions`, "sandbox");
      assert.equal(response.status, 200);
      assert.ok((await response.json()).transactions);
    });

    test("INVALID_ARGUMENT with its reason for an unspecified environment", async () => {
      const error = await new Promise((resolve) =>
        client.stub.GetToken({ environment: "ENVIRONMENT_UNSPECIFIED" }, (e) => resolve(e)),
      );
      const brokerError = BrokerError.fromServiceError(error);
      assert.equal(brokerError.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(brokerError.reason, "ENVIRONMENT_UNSPECIFIED");
      assert.equal(brokerError.retryable, false);
    });

    test("WatchToken follows two rotations", async () => {
      const seen = [];
      await new Promise((resolve, reject) => {
        const call = client.watchTokens(
          "sandbox",
          (kind, value) => {
            if (kind !== "token") return;
            if (!seen.includes(value.tokenId)) seen.push(value.tokenId);
            if (seen.length === 3) {
              call.cancel();
              resolve();
            }
          },
          reject,
        );
      });
      assert.equal(new Set(seen).size, 3);
    });

    test("RefreshToken replaces a rejected token", async () => {
      const token = await client.getToken("production");
      const newer = await client.refreshToken("production", token.tokenId);
      assert.notEqual(newer.tokenId, token.tokenId);
    });

    test("health reports SERVING", async () => {
      const checker = new HealthClient(broker.targets[transport], grpc.credentials.createInsecure());
      try {
        // SERVING once every environment holds a token; poll until then.
        const deadline = Date.now() + 30_000;
        for (;;) {
          const reply = await new Promise((resolve, reject) =>
            checker.Check({ service: "flute.tokenbroker.v1.TokenBroker" }, (e, r) => (e ? reject(e) : resolve(r))),
          );
          if (reply.status === SERVING) break;
          assert.ok(Date.now() < deadline, "never SERVING");
          await new Promise((r) => setTimeout(r, 100));
        }
      } finally {
        checker.close();
      }
    });
  });
}

/** `serve --dev` on `sock`; resolves once its banner is out. */
async function startDevOn(sock) {
  const proc = spawn(BIN, ["serve", "--dev", "--admin-listen", "", "--listen", `unix:${sock}`], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  for await (const line of readline.createInterface({ input: proc.stdout })) {
    if (line.startsWith("Stop with")) return proc;
  }
  throw new Error("serve --dev exited before its banner");
}

async function waitUntil(what, condition, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    assert.ok(Date.now() < deadline, what);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// Two brokers on one socket, as a DaemonSet rolling update runs them: the
// follower's stream on the old broker ends with SHUTTING_DOWN, it reconnects
// at once and holds the new broker's current token; getToken keeps answering.
test("a follower and getToken survive a broker handover", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "flute-node-handover-"));
  const sock = path.join(dir, "broker.sock");
  const old = await startDevOn(sock);
  const client = new BrokerClient(`unix:${sock}`);
  const first = await client.getToken("sandbox");
  const seen = [];
  const follower = new BrokerClient(`unix:${sock}`);
  const following = follower.followTokens(
    "sandbox",
    (kind, value) => kind === "token" && seen.push(value.tokenId),
    (error) => assert.fail(`the follower failed: ${error.message}`),
  );
  await waitUntil("the follower has the first token", () => seen.includes(first.tokenId));
  const inode = fs.statSync(sock).ino;
  const fresh = await startDevOn(sock);
  await waitUntil("the new broker takes over the socket", () => fs.statSync(sock).ino !== inode);
  old.kill("SIGTERM");
  assert.equal(await new Promise((resolve) => old.on("exit", resolve)), 0);
  const probe = new BrokerClient(`unix:${sock}`);
  const current = await probe.getToken("sandbox");
  probe.close();
  assert.notEqual(current.tokenId, first.tokenId, "a new caller reaches the new broker");
  await waitUntil("the follower holds the new broker's token", () => seen.at(-1) === current.tokenId);
  assert.equal((await client.getToken("sandbox")).tokenId, current.tokenId, "the old channel reconnected");
  following.stop();
  follower.close();
  client.close();
  fresh.kill("SIGTERM");
  assert.equal(await new Promise((resolve) => fresh.on("exit", resolve)), 0);
});
