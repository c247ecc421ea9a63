// A unary call: sentiment analysis, printed as JSON.
//   PIPESERVE_TARGET=localhost:8001 node examples/classify.mjs "I love this" ["I hate bugs" ...]
import { pipeline } from '../src/index.js';

const texts = process.argv.slice(2);
const classify = pipeline('sentiment-analysis', {
  target: process.env.PIPESERVE_TARGET ?? 'localhost:8001',
  token: process.env.PIPESERVE_TOKEN, // when the server runs with --auth-token
  timeout: 10, // seconds, retries included
});
try {
  const result = await classify(texts.length === 1 ? texts[0] : texts.length ? texts : 'I love this');
  console.log(JSON.stringify(result));
} finally {
  classify.close();
}
