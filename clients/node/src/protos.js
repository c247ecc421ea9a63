// Loads pipeserve's .proto files at run time: the same files the server is built from, so the
// client never carries generated code that could drift from them.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The protos/ folder: $PIPESERVE_PROTOS, else the repository's (clients/node/src → protos). */
export function defaultProtoRoot() {
  return process.env.PIPESERVE_PROTOS || path.resolve(HERE, '..', '..', '..', 'protos');
}

// How messages look in JavaScript: camelCase fields (textPairs, topK), enums by name
// ("POOLING_MEAN"), 64-bit integers as Numbers, unset fields with their defaults.
export const LOADER_OPTIONS = Object.freeze({
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});

const cache = new Map();

/**
 * The `pipeserve.v1` package: service constructors by name (e.g. `TextClassificationService`).
 * @param {string} [protoRoot]
 * @returns {Record<string, any>}
 */
export function loadPipeserve(protoRoot = defaultProtoRoot()) {
  if (!cache.has(protoRoot)) {
    const folder = path.join(protoRoot, 'pipeserve', 'v1');
    const files = readdirSync(folder)
      .filter((name) => name.endsWith('.proto'))
      .sort()
      .map((name) => path.join('pipeserve', 'v1', name));
    const definition = protoLoader.loadSync(files, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
    cache.set(protoRoot, grpc.loadPackageDefinition(definition).pipeserve.v1);
  }
  return cache.get(protoRoot);
}

/**
 * Every service of pipeserve.v1 with its methods and their streaming shapes.
 * @param {string} [protoRoot]
 * @returns {Record<string, Record<string, {requestStream: boolean, responseStream: boolean}>>}
 */
export function describeServices(protoRoot = defaultProtoRoot()) {
  const pkg = loadPipeserve(protoRoot);
  const services = {};
  for (const [name, value] of Object.entries(pkg)) {
    if (typeof value !== 'function' || !value.service) continue;
    services[name] = {};
    for (const def of Object.values(value.service)) {
      const method = def.path.split('/').pop(); // the proto's spelling, e.g. 'Classify'
      services[name][method] = { requestStream: def.requestStream, responseStream: def.responseStream };
    }
  }
  return services;
}
