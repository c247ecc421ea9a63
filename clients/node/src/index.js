// pipeserve's Node.js client.
//
//   import { pipeline, connect } from '@pipeserve/client';
//   const classify = pipeline('sentiment-analysis', { target: 'localhost:8001' });
//   await classify('I love this');          // [{ label: 'POSITIVE', score: 0.51 }]
//   classify.close();
//
//   const client = connect({ target: 'unix:/run/pipeserve/pipeserve.sock', token: 's3cret' });
//   await client.call('TextClassificationService', 'Classify', { inputs: ['I love this'] });
//   for await (const msg of client.stream('SomeService', 'SomeStreamingMethod', request)) { ... }
import * as grpc from '@grpc/grpc-js';

import { channelOptions, credentials, invokeStream, invokeUnary, resolveTarget } from './connection.js';
import { describeServices, loadPipeserve } from './protos.js';
import { camelParams, CODECS, codecFor } from './tasks.js';

export { grpc };
export { CODECS, codecFor, describeServices, loadPipeserve };

/** A grpc.status code's name, e.g. statusName(5) === 'NOT_FOUND'. */
export function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

/**
 * Typed access to every pipeserve.v1 service over one connection.
 * Unary methods resolve with the response message; server-streaming methods are async iterators.
 */
export class PipeserveClient {
  /** @param {import('./connection.js').ConnectionOptions & {protoRoot?: string}} [options] */
  constructor(options = {}) {
    this.options = { ...options, target: resolveTarget(options) };
    this.package = loadPipeserve(options.protoRoot);
    this.services = describeServices(options.protoRoot);
    this._clients = new Map();
    this._credentials = credentials(this.options);
  }

  /** The raw grpc-js client of a service (e.g. 'TextClassificationService'). */
  client(service) {
    if (!this._clients.has(service)) {
      const Service = this.package[service];
      if (typeof Service !== 'function') {
        throw new Error(`unknown service '${service}'; known: ${Object.keys(this.services).join(', ')}`);
      }
      this._clients.set(service, new Service(this.options.target, this._credentials, channelOptions(this.options)));
    }
    return this._clients.get(service);
  }

  _method(service, method, streaming) {
    const shape = this.services[service]?.[method];
    if (!shape) throw new Error(`unknown method ${service}.${method}`);
    if (shape.responseStream !== streaming || shape.requestStream) {
      throw new Error(`${service}.${method} is ${shape.responseStream ? 'server-streaming: use stream()' : 'unary: use call()'}`);
    }
  }

  /** Calls a unary RPC; `timeout` (seconds) bounds the call, retries on UNAVAILABLE included. */
  call(service, method, request, { timeout } = {}) {
    this._method(service, method, false);
    return invokeUnary(this.client(service), method, request, this.options, timeout);
  }

  /** Calls a server-streaming RPC: an async iterator of its messages. */
  stream(service, method, request, { timeout } = {}) {
    this._method(service, method, true);
    return invokeStream(this.client(service), method, request, this.options, timeout);
  }

  close() {
    for (const client of this._clients.values()) client.close();
    this._clients.clear();
  }
}

/** @param {import('./connection.js').ConnectionOptions & {protoRoot?: string}} [options] */
export function connect(options = {}) {
  return new PipeserveClient(options);
}

/**
 * transformers' pipeline(), run by a pipeserve server: an async function of (inputs, params)
 * that resolves with what transformers' pipeline returns for the task.
 *
 * @param {string} task e.g. 'sentiment-analysis', 'feature-extraction'
 * @param {import('./connection.js').ConnectionOptions & {model?: string, client?: PipeserveClient}} [options]
 */
export function pipeline(task, options = {}) {
  const codec = codecFor(task);
  const { model = '', client: shared, ...connection } = options;
  const client = shared ?? connect(connection);

  async function run(inputs, params = {}) {
    const { timeout, ...rest } = camelParams(params);
    const request = { model, ...codec.build(inputs, rest, task) };
    const response = await client.call(codec.service, codec.method, request, { timeout });
    return codec.shape(response, inputs, rest);
  }
  run.task = codec.task;
  run.model = model;
  run.client = client;
  if (codec.stream) {
    // Streaming tasks: an async iterator of pieces as the server produces them.
    run.stream = (input, params = {}) => {
      const { timeout, ...rest } = camelParams(params);
      const request = { model, ...codec.stream.build(input, rest) };
      return codec.stream.shape(client.stream(codec.service, codec.stream.method, request, { timeout }));
    };
  }
  run.close = () => {
    if (!shared) client.close();
  };
  return run;
}
