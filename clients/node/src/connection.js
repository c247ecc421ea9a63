// How to reach a pipeserve server and how to call it: TCP or unix socket, TLS / mTLS, a bearer
// token, deadlines, and retries with backoff on UNAVAILABLE.
import { readFileSync } from 'node:fs';

import * as grpc from '@grpc/grpc-js';

export const DEFAULT_TARGET = 'localhost:8001';
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
// Worth retrying: the server is momentarily unable to answer (a replica draining, a sidecar not
// bound yet). Every other status is the caller's to handle.
const RETRYABLE = new Set([grpc.status.UNAVAILABLE]);

/**
 * @typedef {object} ConnectionOptions
 * @property {string} [target] "host:port" or "unix:/path/to.sock"; default $PIPESERVE_TARGET, else localhost:8001
 * @property {string|boolean} [tlsCa] PEM file of the CA that signed the server's certificate; true: system roots
 * @property {string} [tlsCert] client certificate chain (PEM file), for mTLS
 * @property {string} [tlsKey] client private key (PEM file), for mTLS
 * @property {string} [tlsServerName] the name the server's certificate carries, when not the target's host
 * @property {string} [token] sent as `authorization: Bearer <token>`
 * @property {number} [timeout] seconds for a whole call, retries included
 * @property {number} [retries] attempts after the first on UNAVAILABLE (default 3)
 * @property {number} [backoff] first backoff in seconds (default 0.1), doubled per attempt, with jitter
 * @property {boolean} [waitForReady] wait for the server to come up, and keep retrying UNAVAILABLE
 *   answers (models loading, a reload, a drain) until the deadline, instead of failing at once
 * @property {Record<string,string>} [metadata] extra metadata on every call
 * @property {string} [lbPolicy] 'round_robin' spreads calls over every address of a dns:/// target
 */

/** @param {ConnectionOptions} options */
export function credentials(options) {
  if (!options.tlsCa && !options.tlsCert) return grpc.credentials.createInsecure();
  if (Boolean(options.tlsCert) !== Boolean(options.tlsKey)) {
    throw new Error('mTLS needs both tlsCert and tlsKey');
  }
  const read = (file) => (file ? readFileSync(file) : null);
  const root = typeof options.tlsCa === 'string' ? read(options.tlsCa) : null;
  return grpc.credentials.createSsl(root, read(options.tlsKey), read(options.tlsCert));
}

/** @param {ConnectionOptions} options */
export function channelOptions(options) {
  const channel = {
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  };
  if (options.tlsServerName) channel['grpc.ssl_target_name_override'] = options.tlsServerName;
  if (options.lbPolicy) {
    channel['grpc.service_config'] = JSON.stringify({ loadBalancingConfig: [{ [options.lbPolicy]: {} }] });
  }
  return channel;
}

/** @param {ConnectionOptions} options */
export function callMetadata(options) {
  // grpc-js takes wait-for-ready as a metadata option, not a call option.
  const metadata = new grpc.Metadata({ waitForReady: Boolean(options.waitForReady) });
  for (const [key, value] of Object.entries(options.metadata ?? {})) metadata.set(key.toLowerCase(), value);
  if (options.token) metadata.set('authorization', `Bearer ${options.token}`);
  return metadata;
}

/** @param {ConnectionOptions} options */
export function resolveTarget(options) {
  return options.target || process.env.PIPESERVE_TARGET || DEFAULT_TARGET;
}

// One call's deadline across its attempts: each attempt gets what is left, not a fresh timeout.
class CallBudget {
  constructor(options, timeout) {
    this.options = options;
    const seconds = timeout ?? options.timeout;
    this.deadline = seconds == null ? null : Date.now() + seconds * 1000;
  }

  callOptions() {
    const callOptions = {};
    if (this.deadline !== null) callOptions.deadline = new Date(this.deadline);
    return callOptions;
  }

  // Milliseconds before the next attempt, or null when the error is final.
  retryDelay(error, attempt) {
    if (!RETRYABLE.has(error?.code)) return null;
    // waitForReady rides through transient states (models loading, a reload, a drain) until the
    // deadline; otherwise `retries` caps the attempts.
    if (attempt >= (this.options.retries ?? 3) && !this.options.waitForReady) return null;
    const base = (this.options.backoff ?? 0.1) * 1000 * 2 ** Math.min(attempt, 30);
    const delay = Math.min(base, 5000) * (0.5 + Math.random() / 2);
    if (this.deadline !== null && Date.now() + delay >= this.deadline) return null;
    return delay;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Calls a unary method of a grpc-js client; resolves with the response message.
 * Errors are grpc-js ServiceErrors: `code` (grpc.status), `details`, `metadata`.
 */
export async function invokeUnary(client, method, request, options, timeout) {
  const budget = new CallBudget(options, timeout);
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await new Promise((resolve, reject) => {
        client[method](request, callMetadata(options), budget.callOptions(), (error, response) =>
          error ? reject(error) : resolve(response),
        );
      });
    } catch (error) {
      const delay = budget.retryDelay(error, attempt);
      if (delay === null) throw error;
      await sleep(delay);
    }
  }
}

/**
 * Calls a server-streaming method; an async iterator of its messages. Retries on UNAVAILABLE
 * only before the first message (a stream that has begun cannot be resumed). Leaving the loop
 * early (break, return, throw) cancels the call on the server.
 */
export async function* invokeStream(client, method, request, options, timeout) {
  const budget = new CallBudget(options, timeout);
  for (let attempt = 0; ; attempt += 1) {
    const call = client[method](request, callMetadata(options), budget.callOptions());
    let started = false;
    let delay = null;
    try {
      for await (const message of call) {
        started = true;
        yield message;
      }
      return;
    } catch (error) {
      delay = started ? null : budget.retryDelay(error, attempt);
      if (delay === null) throw error;
    } finally {
      call.cancel(); // a no-op once the stream has ended
    }
    await sleep(delay);
  }
}
