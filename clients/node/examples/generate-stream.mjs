// A server-streaming call: text generation, printed token by token as the server makes them.
//   PIPESERVE_TARGET=localhost:8001 node examples/generate-stream.mjs "Once upon a time"
import { pipeline } from '../src/index.js';

const prompt = process.argv[2] ?? 'Once upon a time';
const generate = pipeline('text-generation', {
  target: process.env.PIPESERVE_TARGET ?? 'localhost:8001',
  token: process.env.PIPESERVE_TOKEN,
});
try {
  process.stdout.write(prompt);
  let last = null;
  // Leaving the loop early (break) cancels the generation on the server.
  for await (const piece of generate.stream(prompt, { max_new_tokens: 32, timeout: 60 })) {
    process.stdout.write(piece.text);
    last = piece;
  }
  process.stdout.write('\n');
  if (last?.finishReason) console.error(`[${last.finishReason}, ${last.usage?.generatedTokens ?? '?'} tokens]`);
} finally {
  generate.close();
}
