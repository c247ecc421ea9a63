// The Node client against a live pipeserve server. tests/test_node_client.py and
// tests/test_security.py start the real server and run this file with:
//   PIPESERVE_TARGET            a plaintext server with the default model repository
//   PIPESERVE_TEST_EXPECTED     a JSON file: calls and the results pipeserve's Python SDK got for them
//   PIPESERVE_TEST_SECURE_*     a server with mTLS and a bearer token (TARGET, TLS_CA, TLS_CERT,
//                               TLS_KEY, TOKEN) and its unix socket (UNIX_TARGET)
// Tests whose server is not given are skipped.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, describe, test } from 'node:test';

import { connect, describeServices, grpc, pipeline, statusName } from '../src/index.js';

const env = process.env;
const TARGET = env.PIPESERVE_TARGET;
const plain = { skip: !TARGET && 'PIPESERVE_TARGET is not set' };
const secureEnv = (name) => env[`PIPESERVE_TEST_SECURE_${name}`];
const secure = { skip: !secureEnv('TARGET') && 'PIPESERVE_TEST_SECURE_TARGET is not set' };

const closing = [];
function open(task, options) {
  const remote = pipeline(task, options);
  closing.push(remote);
  return remote;
}
after(() => closing.forEach((remote) => remote.close()));

// Floats travel as float32 both ways; both clients read the same bytes, so they agree exactly.
function assertClose(actual, expected, path = '$') {
  if (typeof expected === 'number') {
    assert.ok(Math.abs(actual - expected) <= 1e-6 * Math.max(1, Math.abs(expected)), `${path}: ${actual} != ${expected}`);
  } else if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${path}: not an array`);
    assert.equal(actual.length, expected.length, `${path}: length`);
    expected.forEach((item, i) => assertClose(actual[i], item, `${path}[${i}]`));
  } else if (expected && typeof expected === 'object') {
    assert.deepEqual(Object.keys(actual).sort(), Object.keys(expected).sort(), `${path}: keys`);
    for (const key of Object.keys(expected)) assertClose(actual[key], expected[key], `${path}.${key}`);
  } else {
    assert.equal(actual, expected, path);
  }
}

async function rejectsWith(promise, code) {
  await assert.rejects(promise, (error) => {
    assert.equal(statusName(error.code), code, `${statusName(error.code)}: ${error.details}`);
    return true;
  });
}

describe('pipeline() against a live server', plain, () => {
  test('every call gives what the Python SDK gives (transformers-shaped results)', async () => {
    const expected = JSON.parse(readFileSync(env.PIPESERVE_TEST_EXPECTED, 'utf8'));
    assert.ok(expected.length > 0);
    for (const { task, inputs, params, result } of expected) {
      const remote = open(task, { target: TARGET });
      assertClose(await remote(inputs, params), result, `${task}(${JSON.stringify(inputs)}, ${JSON.stringify(params)})`);
    }
  });

  test('sentiment-analysis: one label per input, or every label with top_k null', async () => {
    const classify = open('sentiment-analysis', { target: TARGET });
    const best = await classify(['I like pizza', 'I hate bugs']);
    assert.equal(best.length, 2);
    for (const { label, score } of best) {
      assert.equal(typeof label, 'string');
      assert.ok(score > 0 && score <= 1);
    }
    const all = await classify('I like pizza', { top_k: null });
    assert.ok(all.length >= 2);
    assert.ok(Math.abs(all.reduce((sum, { score }) => sum + score, 0) - 1) < 1e-4, 'softmax scores sum to 1');
    assert.ok(all[0].score >= all[1].score, 'best first');
  });

  test('feature-extraction: pooled unit vectors', async () => {
    const embed = open('feature-extraction', { target: TARGET });
    const vectors = await embed(['a', 'b'], { pooling: 'mean', normalize: true });
    assert.equal(vectors.length, 2);
    for (const vector of vectors) {
      const norm = Math.sqrt(vector.reduce((sum, x) => sum + x * x, 0));
      assert.ok(Math.abs(norm - 1) < 1e-4, `norm ${norm}`);
    }
  });

  test('server errors arrive as gRPC status codes', async () => {
    await rejectsWith(open('sentiment-analysis', { target: TARGET, model: 'no-such-model' })('x'), 'NOT_FOUND');
    await rejectsWith(open('sentiment-analysis', { target: TARGET })([]), 'INVALID_ARGUMENT');
  });

  test('a deadline shorter than the call gives DEADLINE_EXCEEDED', async () => {
    const classify = open('sentiment-analysis', { target: TARGET });
    await rejectsWith(classify('x', { timeout: 0.000001 }), 'DEADLINE_EXCEEDED');
  });

  test('lbPolicy round_robin over a resolved address list (a headless Service)', async () => {
    const classify = open('sentiment-analysis', { target: `ipv4:${TARGET},${TARGET}`, lbPolicy: 'round_robin' });
    for (let i = 0; i < 3; i += 1) assert.equal(typeof (await classify('x'))[0].label, 'string');
  });

  test('the typed client calls any service, and knows each method\'s shape', async () => {
    const client = connect({ target: TARGET });
    try {
      const { models } = await client.call('ModelService', 'ListModels', {});
      assert.ok(models.length > 0);
      assert.ok(describeServices().TextClassificationService.Classify);
      assert.throws(() => client.call('NoSuchService', 'X', {}), /unknown method/);
    } finally {
      client.close();
    }
  });
});

describe('streaming text generation', { skip: (plain.skip || !(env.PIPESERVE_TEST_TASKS ?? '').split(',').includes('text-generation')) && 'no text-generation model is served' }, () => {
  test('stream() yields the text the unary call returns, then the finish reason', async () => {
    const generate = open('text-generation', { target: TARGET });
    const params = { max_new_tokens: 8, do_sample: false };
    const [{ generated_text: expected }] = await generate('Once upon a time', { ...params, return_full_text: false });
    const pieces = [];
    for await (const piece of generate.stream('Once upon a time', params)) pieces.push(piece);
    assert.equal(pieces.map((p) => p.text).join(''), expected);
    const last = pieces.at(-1);
    assert.ok(['length', 'eos', 'stop_sequence'].includes(last.finishReason), last.finishReason);
    assert.equal(pieces.reduce((n, p) => n + p.tokenIds.length, 0), last.usage.generatedTokens);
  });

  test('leaving the loop early ends the stream', async () => {
    const generate = open('text-generation', { target: TARGET });
    let count = 0;
    for await (const piece of generate.stream('Hello', { max_new_tokens: 50 })) {
      assert.equal(typeof piece.text, 'string');
      count += 1;
      if (count === 2) break;
    }
    assert.equal(count, 2);
  });
});

const chatEnv = env.PIPESERVE_TEST_CHAT_EXPECTED;
describe('conversations', { skip: (plain.skip || !chatEnv) && 'no chat model is served' }, () => {
  test('a conversation, or several, gets what the Python SDK gets (the reply appended)', async () => {
    const { model, calls } = JSON.parse(readFileSync(chatEnv, 'utf8'));
    const generate = open('text-generation', { target: TARGET, model });
    for (const { inputs, params, result } of calls) {
      assertClose(await generate(inputs, params), result, `chat(${JSON.stringify(inputs)}, ${JSON.stringify(params)})`);
    }
  });

  test('stream() of a conversation yields the reply the unary call returns', async () => {
    const { model } = JSON.parse(readFileSync(chatEnv, 'utf8'));
    const generate = open('text-generation', { target: TARGET, model });
    const messages = [{ role: 'user', content: 'Hello there' }];
    const [{ generated_text: reply }] = await generate(messages, { max_new_tokens: 6, return_full_text: false });
    const pieces = [];
    for await (const piece of generate.stream(messages, { max_new_tokens: 6 })) pieces.push(piece.text);
    assert.equal(pieces.join(''), reply);
  });

  test('parameters beyond the typed fields travel by name, and unknown ones are refused by name', async () => {
    const generate = open('text-generation', { target: TARGET });
    const [{ generated_text: text }] = await generate('Hello', { max_new_tokens: 4, sequenceBias: [[[5], 2.5]] });
    assert.equal(typeof text, 'string');
    await assert.rejects(generate('Hello', { no_such_parameter: 1 }), (error) => {
      assert.equal(statusName(error.code), 'INVALID_ARGUMENT');
      assert.match(error.details, /^no_such_parameter: /);
      return true;
    });
  });
});

describe('connection behaviour', () => {
  test('UNAVAILABLE is retried with backoff, then reported', async () => {
    // A port on loopback that nothing listens on (port 1 is reserved: tcpmux).
    const classify = open('sentiment-analysis', { target: '127.0.0.1:1', retries: 2, backoff: 0.1 });
    const started = Date.now();
    await rejectsWith(classify('x'), 'UNAVAILABLE');
    // Two backoffs of at least 0.05 s and 0.1 s (jitter takes off at most half).
    assert.ok(Date.now() - started >= 150, `gave up after ${Date.now() - started} ms`);
  });

  test('waitForReady waits for the server until the deadline', async () => {
    const classify = open('sentiment-analysis', { target: '127.0.0.1:1', waitForReady: true, timeout: 0.3 });
    await rejectsWith(classify('x'), 'DEADLINE_EXCEEDED');
  });

  test('mTLS needs both a certificate and a key', () => {
    assert.throws(() => connect({ target: 'localhost:1', tlsCa: true, tlsCert: 'cert.pem' }), /both tlsCert and tlsKey/);
  });
});

describe('secure server: mTLS, bearer token, unix socket', secure, () => {
  const tls = () => ({
    target: secureEnv('TARGET'),
    tlsCa: secureEnv('TLS_CA'),
    tlsCert: secureEnv('TLS_CERT'),
    tlsKey: secureEnv('TLS_KEY'),
  });

  test('secure: mTLS with the token is answered', async () => {
    const [result] = await open('sentiment-analysis', { ...tls(), token: secureEnv('TOKEN') })('I love this');
    assert.equal(typeof result.label, 'string');
  });

  test('secure: a wrong or missing token is UNAUTHENTICATED', async () => {
    await rejectsWith(open('sentiment-analysis', { ...tls(), token: 'wrong' })('x'), 'UNAUTHENTICATED');
    await rejectsWith(open('sentiment-analysis', tls())('x'), 'UNAUTHENTICATED');
  });

  test('secure: without a client certificate the TLS handshake fails', async () => {
    const options = { ...tls(), tlsCert: undefined, tlsKey: undefined, token: secureEnv('TOKEN'), retries: 0 };
    await rejectsWith(open('sentiment-analysis', options)('x'), 'UNAVAILABLE');
  });

  test('secure: the unix socket target answers with the token', async () => {
    const target = secureEnv('UNIX_TARGET');
    const [result] = await open('sentiment-analysis', { target, token: secureEnv('TOKEN') })('I love this');
    assert.equal(typeof result.label, 'string');
    await rejectsWith(open('sentiment-analysis', { target })('x'), 'UNAUTHENTICATED');
  });
});

test('grpc-js is re-exported for status codes and metadata', () => {
  assert.equal(grpc.status.UNAUTHENTICATED, 16);
});
