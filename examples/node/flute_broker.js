// A copyable Node.js client for flute-token-broker.
//
// Requires @grpc/grpc-js and @grpc/proto-loader (npm install). The broker's
// proto is loaded at run time from a copy of its proto/ directory (PROTO_ROOT
// or the `protoRoot` option); nothing generated needs to be committed.
//
//   const { BrokerClient } = require("./flute_broker");
//   const broker = new BrokerClient("unix:/run/flute-token-broker/broker.sock");
//   const token = await broker.getToken("sandbox");
//   fetch(url, { headers: { Authorization: `Bearer ${token.accessToken}` } });
//
// Every failure is a BrokerError whose `reason` is the stable
// google.rpc.ErrorInfo reason the broker attaches (listed in the proto);
// branch on it, never on the message text.

"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = process.env.FLUTE_BROKER_PROTO_ROOT || path.join(__dirname, "..", "..", "proto");
const PROTO_FILE = "flute/tokenbroker/v1/token_broker.proto";
const ERROR_DOMAIN = "tokenbroker.flute.com";
// Reasons after which the same call can succeed later.
const RETRYABLE_REASONS = new Set(["NO_VALID_TOKEN", "TOKEN_WAIT_EXCEEDED", "SHUTTING_DOWN"]);

// google.rpc.Status, ErrorInfo and RetryInfo: the three messages needed to
// read the broker's error details (grpc-status-details-bin).
const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
          },
        },
      },
    },
  },
});
const RpcStatus = rpcTypes.lookupType("google.rpc.Status");
const ErrorInfo = rpcTypes.lookupType("google.rpc.ErrorInfo");
const RetryInfo = rpcTypes.lookupType("google.rpc.RetryInfo");

/** A failed broker call: the gRPC code, the broker's stable reason (null
 * for transport errors, which carry no ErrorInfo), the reason's metadata
 * (such as "environment") and the suggested retry delay in seconds. */
class BrokerError extends Error {
  constructor(code, message, reason = null, metadata = {}, retryAfter = null) {
    super(`${grpc.status[code]}: ${message}`);
    this.code = code;
    this.reason = reason;
    this.metadata = metadata;
    this.retryAfter = retryAfter;
  }

  get retryable() {
    return RETRYABLE_REASONS.has(this.reason);
  }

  static fromServiceError(error) {
    let reason = null;
    let metadata = {};
    let retryAfter = null;
    const details = error.metadata ? error.metadata.get("grpc-status-details-bin") : [];
    if (details.length > 0) {
      const status = RpcStatus.decode(details[0]);
      for (const any of status.details) {
        if (any.type_url.endsWith("/google.rpc.ErrorInfo")) {
          const info = ErrorInfo.decode(any.value);
          if (info.domain === ERROR_DOMAIN) {
            reason = info.reason;
            metadata = { ...info.metadata };
          }
        } else if (any.type_url.endsWith("/google.rpc.RetryInfo")) {
          const delay = RetryInfo.decode(any.value).retry_delay || {};
          retryAfter = Number(delay.seconds || 0) + (delay.nanos || 0) / 1e9;
        }
      }
    }
    return new BrokerError(error.code, error.details, reason, metadata, retryAfter);
  }
}

function loadPackage(protoRoot) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).flute.tokenbroker.v1;
}

/** GetToken, WatchToken and RefreshToken over TCP ("127.0.0.1:50051") or a
 * Unix socket ("unix:/path/broker.sock"), with default channel options. */
class BrokerClient {
  constructor(target = "127.0.0.1:50051", { protoRoot = PROTO_ROOT } = {}) {
    this.pb = loadPackage(protoRoot);
    this.stub = new this.pb.TokenBroker(target, grpc.credentials.createInsecure());
  }

  static environment(name) {
    return `ENVIRONMENT_${name.toUpperCase()}`;
  }

  // waitForReady: a broker started by hand or restarted without systemd's
  // socket (or between a DaemonSet's pods) is briefly not listening; the call
  // then waits for it within its deadline instead of failing at once. Under
  // socket activation or the DaemonSet handover the default (fail-fast)
  // never sees a gap; this costs nothing there.
  #unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline: Date.now() + timeoutMs, waitForReady: true }, (error, reply) => {
        if (error) reject(BrokerError.fromServiceError(error));
        else resolve(reply);
      });
    });
  }

  /** The current token. Rejects with a BrokerError, e.g. reason
   * NO_VALID_TOKEN (retry after `retryAfter` seconds) or
   * ENVIRONMENT_NOT_ENABLED / CALLER_NOT_ALLOWED (retrying cannot help). */
  async getToken(environment, { minRemainingSeconds = null, timeoutMs = 10_000 } = {}) {
    const request = { environment: BrokerClient.environment(environment) };
    if (minRemainingSeconds !== null) request.minRemaining = { seconds: minRemainingSeconds, nanos: 0 };
    return (await this.#unary("GetToken", request, timeoutMs)).token;
  }

  /** As getToken, but waits out retryable failures for up to `deadlineMs`,
   * sleeping as the broker's RetryInfo suggests. */
  async getTokenWaiting(environment, { deadlineMs = 60_000, defaultRetryMs = 1_000 } = {}) {
    const deadline = Date.now() + deadlineMs;
    for (;;) {
      try {
        return await this.getToken(environment, { timeoutMs: Math.max(deadline - Date.now(), 100) });
      } catch (error) {
        const left = deadline - Date.now();
        if (!(error instanceof BrokerError) || !error.retryable || left <= 0) throw error;
        const wait = error.retryAfter !== null ? error.retryAfter * 1000 : defaultRetryMs;
        await new Promise((r) => setTimeout(r, Math.min(Math.max(wait, 50), left)));
      }
    }
  }

  /** Report a token the API answered 401 to; resolves to a newer one. */
  async refreshToken(environment, rejectedTokenId, { timeoutMs = 10_000 } = {}) {
    const request = { environment: BrokerClient.environment(environment), rejectedTokenId };
    return (await this.#unary("RefreshToken", request, timeoutMs)).token;
  }

  /** Follows rotations and outages: `onUpdate("token", Token)` or
   * `onUpdate("outage", Outage)`, the current state first. Returns the call;
   * `call.cancel()` stops it. `onError` gets a BrokerError when the stream
   * ends with one (a restarting broker: reconnect). */
  watchTokens(environment, onUpdate, onError = () => {}) {
    const call = this.stub.WatchToken({ environment: BrokerClient.environment(environment) }, { waitForReady: true });
    call.on("data", (update) => onUpdate(update.update, update[update.update]));
    call.on("error", (error) => {
      if (error.code !== grpc.status.CANCELLED) onError(BrokerError.fromServiceError(error));
    });
    return call;
  }

  /** Like watchTokens, for ever: when the broker ends the stream because it
   * stops or restarts (reason SHUTTING_DOWN) it reconnects at once, to the
   * successor or another replica, and the current token comes first again;
   * when the broker cannot be reached it retries after 1 s, 2 s, 4 s ... up
   * to `maxBackoffMs`. Any other error goes to `onError` and ends it.
   * Returns { stop() }. */
  followTokens(environment, onUpdate, onError = () => {}, { maxBackoffMs = 30_000 } = {}) {
    let call = null;
    let stopped = false;
    let backoffMs = 0;
    let timer = null;
    const connect = () => {
      if (stopped) return;
      call = this.watchTokens(
        environment,
        (kind, value) => {
          backoffMs = 0;
          onUpdate(kind, value);
        },
        (error) => {
          if (stopped) return;
          if (error.reason === "SHUTTING_DOWN") return connect();
          if (error.reason !== null || error.code !== grpc.status.UNAVAILABLE) return onError(error);
          backoffMs = Math.min(Math.max(backoffMs * 2, 1_000), maxBackoffMs);
          timer = setTimeout(connect, backoffMs);
        },
      );
    };
    connect();
    return {
      stop() {
        stopped = true;
        clearTimeout(timer);
        if (call) call.cancel();
      },
    };
  }

  /** GET `url` with a bearer token; on 401, ask the broker for a newer token
   * and retry once. Resolves to the fetch Response. */
  async authorizedGet(url, environment) {
    let token = await this.getToken(environment);
    for (let attempt = 0; ; attempt++) {
      const response = await fetch(url, { headers: { Authorization: `Bearer ${token.accessToken}` } });
      if (response.status !== 401 || attempt === 1) return response;
      token = await this.refreshToken(environment, token.tokenId);
    }
  }

  close() {
    this.stub.close();
  }
}

module.exports = { BrokerClient, BrokerError, ERROR_DOMAIN };
