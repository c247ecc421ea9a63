// Task codecs: for each pipeline task, the service and method that serve it, how to build the
// request from transformers-style inputs and parameters, and how to shape the response the way
// transformers' pipeline (and pipeserve's Python SDK) returns it.

import { readFileSync } from 'node:fs';

/** snake_case or camelCase parameter names → the request's camelCase fields. */
export function camelParams(params = {}) {
  const out = {};
  for (const [key, value] of Object.entries(params)) {
    out[key.replace(/_([a-z])/g, (_, c) => c.toUpperCase())] = value;
  }
  return out;
}

const asList = (inputs) => (Array.isArray(inputs) ? [inputs, false] : [[inputs], true]);
const one = (results, single) => (single ? results[0] : results);
const has = (params, key) => Object.prototype.hasOwnProperty.call(params, key);

function nest(values, shape) {
  if (shape.length <= 1) return Array.from(values);
  const step = shape[0] ? values.length / shape[0] : 0;
  return Array.from({ length: shape[0] }, (_, i) => nest(values.slice(i * step, (i + 1) * step), shape.slice(1)));
}

const FUNCTIONS = {
  default: 'FUNCTION_TO_APPLY_UNSPECIFIED',
  softmax: 'FUNCTION_TO_APPLY_SOFTMAX',
  sigmoid: 'FUNCTION_TO_APPLY_SIGMOID',
  none: 'FUNCTION_TO_APPLY_NONE',
};

function functionToApply(name) {
  if (name == null) return FUNCTIONS.default;
  if (!(name in FUNCTIONS)) throw new Error(`functionToApply must be one of ${Object.keys(FUNCTIONS).join(', ')}`);
  return FUNCTIONS[name];
}

// topK: undefined → the server's default; null or 0 → every label (as transformers' top_k=None).
function topK(request, params) {
  if (has(params, 'topK')) request.topK = params.topK ?? 0;
}

function labelScores(classification) {
  return classification.labels.map(({ label, score }) => ({ label, score }));
}

const textClassification = {
  task: 'text-classification',
  aliases: ['sentiment-analysis'],
  service: 'TextClassificationService',
  method: 'Classify',
  build(inputs, params) {
    const [items] = asList(inputs);
    const texts = items.map((item) => (typeof item === 'object' ? item.text : item));
    const pairs = items.map((item) => (typeof item === 'object' ? item.textPair ?? item.text_pair ?? '' : ''));
    const request = { inputs: texts, textPairs: pairs.some(Boolean) ? pairs : [] };
    request.functionToApply = functionToApply(params.functionToApply);
    topK(request, params);
    return request;
  },
  shape(response, inputs, params) {
    const results = response.results.map(labelScores);
    // Without topK, transformers' legacy shape: the best label of each input, in a list.
    if (!has(params, 'topK')) return results.map((labels) => labels[0]);
    return one(results, asList(inputs)[1]);
  },
};

const POOLINGS = { none: 'POOLING_UNSPECIFIED', mean: 'POOLING_MEAN', cls: 'POOLING_CLS', max: 'POOLING_MAX' };

const featureExtraction = {
  task: 'feature-extraction',
  aliases: [],
  service: 'FeatureExtractionService',
  method: 'Embed',
  build(inputs, params) {
    const pooling = params.pooling ?? 'none';
    if (!(pooling in POOLINGS)) throw new Error(`pooling must be one of ${Object.keys(POOLINGS).join(', ')}`);
    return { inputs: asList(inputs)[0], pooling: POOLINGS[pooling], normalize: Boolean(params.normalize) };
  },
  shape(response, inputs) {
    const outputs = response.embeddings.map(({ values, shape }) => {
      const nested = nest(values, shape);
      // Token-level features carry a batch axis of 1, [1, tokens, hidden], as transformers returns them.
      return shape.length === 2 ? [nested] : nested;
    });
    return one(outputs, asList(inputs)[1]);
  },
};

const STRATEGIES = {
  none: 'AGGREGATION_STRATEGY_NONE',
  simple: 'AGGREGATION_STRATEGY_SIMPLE',
  first: 'AGGREGATION_STRATEGY_FIRST',
  average: 'AGGREGATION_STRATEGY_AVERAGE',
  max: 'AGGREGATION_STRATEGY_MAX',
};

const tokenClassification = {
  task: 'token-classification',
  aliases: ['ner'],
  service: 'TokenClassificationService',
  method: 'ClassifyTokens',
  build(inputs, params) {
    const strategy = params.aggregationStrategy?.toLowerCase();
    if (strategy != null && !(strategy in STRATEGIES)) {
      throw new Error(`aggregationStrategy must be one of ${Object.keys(STRATEGIES).join(', ')}`);
    }
    const request = {
      inputs: asList(inputs)[0],
      aggregationStrategy: strategy ? STRATEGIES[strategy] : 'AGGREGATION_STRATEGY_UNSPECIFIED',
    };
    if (params.ignoreLabels != null) request.ignoreLabels = { labels: params.ignoreLabels };
    return request;
  },
  shape(response, inputs) {
    const entity = (e) => {
      const out = e.entityGroup
        ? { entity_group: e.entityGroup, score: e.score }
        : { entity: e.entity, score: e.score, index: e.index };
      return { ...out, word: e.word, start: e.start ?? null, end: e.end ?? null };
    };
    return one(response.results.map((r) => r.entities.map(entity)), asList(inputs)[1]);
  },
};

const QA_INTS = ['topK', 'docStride', 'maxAnswerLen', 'maxSeqLen', 'maxQuestionLen'];

const questionAnswering = {
  task: 'question-answering',
  aliases: [],
  service: 'QuestionAnsweringService',
  method: 'Answer',
  // qa({question, context}) or qa([{question, context}, ...]), as in transformers.
  build(inputs, params) {
    const items = Array.isArray(inputs) ? inputs : [inputs];
    for (const item of items) {
      if (!item || typeof item.question !== 'string' || typeof item.context !== 'string') {
        throw new Error("each input needs the keys 'question' and 'context'");
      }
    }
    const request = {
      inputs: items.map(({ question, context }) => ({ question, context })),
      handleImpossibleAnswer: Boolean(params.handleImpossibleAnswer),
    };
    for (const name of QA_INTS) if (params[name] != null) request[name] = params[name];
    if (params.alignToWords != null) request.alignToWords = Boolean(params.alignToWords);
    return request;
  },
  shape(response) {
    const outputs = response.results.map(({ answers }) => {
      const shaped = answers.map(({ score, start, end, answer }) => ({ score, start, end, answer }));
      return shaped.length === 1 ? shaped[0] : shaped;
    });
    return outputs.length === 1 ? outputs[0] : outputs;
  },
};

const fillMask = {
  task: 'fill-mask',
  aliases: [],
  service: 'FillMaskService',
  method: 'FillMask',
  build(inputs, params) {
    const targets = typeof params.targets === 'string' ? [params.targets] : params.targets ?? [];
    const request = { inputs: asList(inputs)[0], targets };
    if (params.topK != null) request.topK = params.topK;
    return request;
  },
  shape(response) {
    const outputs = response.results.map(({ masks }) => {
      const shaped = masks.map(({ predictions }) =>
        predictions.map(({ score, token, tokenStr, sequence }) => ({ score, token, token_str: tokenStr, sequence })),
      );
      return shaped.length === 1 ? shaped[0] : shaped; // one mask: its predictions
    });
    return outputs.length === 1 ? outputs[0] : outputs;
  },
};

const zeroShotClassification = {
  task: 'zero-shot-classification',
  aliases: [],
  service: 'ZeroShotClassificationService',
  method: 'ClassifyZeroShot',
  build(inputs, params) {
    let labels = params.candidateLabels ?? [];
    if (typeof labels === 'string') labels = labels.split(',').map((l) => l.trim()).filter(Boolean);
    return {
      inputs: asList(inputs)[0],
      candidateLabels: labels,
      hypothesisTemplate: params.hypothesisTemplate ?? '',
      multiLabel: Boolean(params.multiLabel),
    };
  },
  shape(response, inputs) {
    const outputs = response.results.map(({ sequence, labels, scores }) => ({ sequence, labels, scores }));
    return one(outputs, asList(inputs)[1]);
  },
};

const imageClassification = {
  task: 'image-classification',
  aliases: [],
  service: 'ImageClassificationService',
  method: 'ClassifyImage',
  // Images as Buffers / Uint8Arrays of an encoded file (PNG, JPEG, ...), or paths to read.
  build(inputs, params) {
    const images = asList(inputs)[0].map((image) => (typeof image === 'string' ? readFileSync(image) : image));
    const request = { inputs: images, functionToApply: functionToApply(params.functionToApply) };
    if (params.topK != null) request.topK = params.topK;
    return request;
  },
  shape(response, inputs) {
    return one(response.results.map(labelScores), asList(inputs)[1]);
  },
};

const FINISH_REASONS = {
  FINISH_REASON_UNSPECIFIED: null,
  FINISH_REASON_LENGTH: 'length',
  FINISH_REASON_EOS: 'eos',
  FINISH_REASON_STOP_SEQUENCE: 'stop_sequence',
  FINISH_REASON_CANCELLED: 'cancelled',
};

/** camelCase back to transformers' snake_case (maxNewTokens → max_new_tokens). */
const snake = (key) => key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
const camel = (key) => key.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

// google.protobuf.Value / Struct / ListValue as proto-loader wants them, and back.
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: toList(value) };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`${typeof value} values cannot cross the wire: send numbers, strings, arrays or objects`);
}
const toList = (values) => ({ values: values.map(toValue) });
const toStruct = (object) => ({ fields: Object.fromEntries(Object.entries(object).map(([k, v]) => [k, toValue(v)])) });

// Decoded with oneofs: `kind` names the field a Value holds (defaults fill in the others).
function fromValue(value) {
  switch (value?.kind) {
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue.values ?? []).map(fromValue);
    case 'stringValue':
    case 'numberValue':
    case 'boolValue':
      return value[value.kind];
    default:
      return null;
  }
}
const fromStruct = (struct) => Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));

// GenerationParameters' own fields (transformers' names); any other parameter goes in `extra`,
// which the server checks by name.
const GENERATION_FIELDS = new Set([
  'max_new_tokens', 'do_sample', 'temperature', 'top_k', 'top_p', 'repetition_penalty', 'seed', 'max_length',
  'min_length', 'min_new_tokens', 'num_beams', 'early_stopping', 'length_penalty', 'no_repeat_ngram_size',
  'typical_p', 'min_p', 'epsilon_cutoff', 'eta_cutoff', 'bad_words_ids', 'eos_token_id', 'pad_token_id',
  'suppress_tokens', 'begin_suppress_tokens', 'encoder_repetition_penalty', 'stop_sequence', 'prefix',
  'handle_long_generation', 'truncation', 'add_special_tokens', 'skip_special_tokens',
  'clean_up_tokenization_spaces', 'continue_final_message', 'tools', 'documents', 'tokenizer_encode_kwargs',
  'return_tensors',
]);
const FIELD_TYPES = {
  bool: new Set(['do_sample', 'early_stopping', 'truncation', 'add_special_tokens', 'skip_special_tokens',
    'clean_up_tokenization_spaces', 'continue_final_message', 'return_tensors']),
  string: new Set(['prefix', 'handle_long_generation']),
  list: new Set(['eos_token_id', 'suppress_tokens', 'begin_suppress_tokens', 'stop_sequence']),
  json: new Set(['tools', 'documents', 'tokenizer_encode_kwargs']),
};
const REQUEST_FIELDS = new Set(['return_full_text', 'num_return_sequences']);
const OWN = new Set(['stop_sequences', 'stop', 'logprobs', 'top_logprobs']);

function fits(name, value) {
  if (FIELD_TYPES.bool.has(name)) return typeof value === 'boolean';
  if (FIELD_TYPES.string.has(name)) return typeof value === 'string';
  if (FIELD_TYPES.list.has(name)) return Array.isArray(value) || typeof value === 'number' || typeof value === 'string';
  if (FIELD_TYPES.json.has(name)) return name === 'tokenizer_encode_kwargs' ? typeof value === 'object' && !Array.isArray(value) : Array.isArray(value);
  if (name === 'bad_words_ids') return Array.isArray(value) && value.every(Array.isArray);
  return typeof value === 'number';
}

/** Call parameters (camelCase or snake_case, transformers' names) as a GenerationParameters message. */
function generationParameters(params) {
  const parameters = {};
  const extra = {};
  for (const [key, value] of Object.entries(params)) {
    const name = snake(key);
    if (value === undefined || value === null || REQUEST_FIELDS.has(name) || OWN.has(name)) continue;
    if (typeof value === 'function') throw new TypeError(`${name} is a function, which cannot cross the wire to the server`);
    if (!GENERATION_FIELDS.has(name) || !fits(name, value)) {
      extra[name] = value;
    } else if (name === 'bad_words_ids') {
      parameters.badWordsIds = value.map((ids) => ({ ids }));
    } else if (FIELD_TYPES.list.has(name)) {
      parameters[camel(name)] = Array.isArray(value) ? value : [value];
    } else if (name === 'tokenizer_encode_kwargs') {
      parameters.tokenizerEncodeKwargs = toStruct(value);
    } else if (FIELD_TYPES.json.has(name)) {
      parameters[camel(name)] = toList(value);
    } else {
      parameters[camel(name)] = value;
    }
  }
  const stop = params.stopSequences ?? params.stop;
  if (stop != null) parameters.stopSequences = typeof stop === 'string' ? [stop] : stop;
  if (params.logprobs) {
    parameters.logprobs = true;
    parameters.topLogprobs = params.topLogprobs ?? 0;
  }
  if (Object.keys(extra).length) parameters.extra = toStruct(extra);
  return parameters;
}

const isMessage = (value) => value != null && typeof value === 'object' && !Array.isArray(value) && 'role' in value && 'content' in value;

/** [conversations, single] as transformers tells a chat from prompts; [null, false] for prompts. */
function chatInputs(inputs) {
  if (!Array.isArray(inputs) || inputs.length === 0) return [null, false];
  if (isMessage(inputs[0])) return [[inputs], true];
  if (inputs.every((c) => Array.isArray(c) && c.length && isMessage(c[0]))) return [inputs, false];
  return [null, false];
}

function chatMessage({ role, content, ...others }) {
  const message = { role: String(role) };
  if (typeof content === 'string') message.content = content;
  else others.content = content;
  if (Object.keys(others).length) message.fields = toStruct(others);
  return message;
}

const conversation = (messages) => ({ messages: messages.map(chatMessage) });

function asMessage({ role, content, fields }) {
  return { role, content, ...(fields ? fromStruct(fields) : {}) };
}

function generatedRecord({ generatedText, generatedTokenIds, conversation: messages }) {
  if (generatedTokenIds?.length) return { generated_token_ids: generatedTokenIds };
  if (messages?.length) return { generated_text: messages.map(asMessage) };
  return { generated_text: generatedText };
}

const textGeneration = {
  task: 'text-generation',
  aliases: [],
  service: 'TextGenerationService',
  method: 'Generate',
  // Prompts, one conversation ([{role, content}, ...]) or several, as transformers' pipeline takes them.
  build(inputs, params) {
    const request = { parameters: generationParameters(params) };
    const [chats] = chatInputs(inputs);
    if (chats) request.conversations = chats.map(conversation);
    else request.inputs = asList(inputs)[0];
    if (params.returnFullText != null) request.returnFullText = Boolean(params.returnFullText);
    if (params.numReturnSequences != null) request.numReturnSequences = params.numReturnSequences;
    return request;
  },
  shape(response, inputs) {
    const outputs = response.results.map(({ sequences }) => sequences.map(generatedRecord));
    const [chats, singleChat] = chatInputs(inputs);
    return one(outputs, chats ? singleChat : asList(inputs)[1]);
  },
  // generate.stream(prompt or conversation, params): { text, tokenIds, finishReason, usage } as tokens are made.
  stream: {
    method: 'GenerateStream',
    build(input, params) {
      const [chats, single] = chatInputs(input);
      const request = { parameters: generationParameters(params) };
      if (chats && single) request.conversation = conversation(chats[0]);
      else if (typeof input === 'string') request.input = input;
      else throw new Error('stream() takes one prompt string or one conversation');
      return request;
    },
    async *shape(messages) {
      for await (const m of messages) {
        yield {
          text: m.text,
          tokenIds: m.tokenIds,
          finishReason: FINISH_REASONS[m.finishReason] ?? null,
          usage: m.usage ? { promptTokens: m.usage.promptTokens, generatedTokens: m.usage.generatedTokens } : null,
        };
      }
    },
  },
};

const SEQ2SEQ_PARAMETERS = [
  'maxNewTokens', 'maxLength', 'minLength', 'numBeams', 'doSample', 'temperature', 'topK', 'topP',
  'noRepeatNgramSize', 'earlyStopping', 'repetitionPenalty', 'lengthPenalty', 'seed', 'numReturnSequences',
];

function seq2seqParameters(params) {
  const parameters = {};
  for (const name of SEQ2SEQ_PARAMETERS) if (params[name] != null) parameters[name] = params[name];
  return parameters;
}

// transformers' shapes: one dict per input when each has one output, else a list per input.
function seq2seqShape(perInput, inputs) {
  if (perInput.every((outputs) => outputs.length === 1)) return perInput.map((outputs) => outputs[0]);
  return typeof inputs === 'string' ? perInput[0] : perInput;
}

const summarization = {
  task: 'summarization',
  aliases: [],
  service: 'SummarizationService',
  method: 'Summarize',
  build(inputs, params) {
    return {
      inputs: asList(inputs)[0],
      parameters: seq2seqParameters(params),
      cleanUpTokenizationSpaces: Boolean(params.cleanUpTokenizationSpaces),
    };
  },
  shape(response, inputs) {
    const perInput = response.results.map(({ summaries }) => summaries.map((s) => ({ summary_text: s.summaryText })));
    return seq2seqShape(perInput, inputs);
  },
};

const translation = {
  task: 'translation',
  aliases: [],
  service: 'TranslationService',
  method: 'Translate',
  // pipeline('translation_en_to_fr') sends srcLang 'en' and tgtLang 'fr', as transformers does.
  build(inputs, params, taskName = 'translation') {
    let { srcLang, tgtLang } = params;
    const pair = /^translation_([A-Za-z_-]+)_to_([A-Za-z_-]+)$/.exec(taskName);
    if (pair && srcLang == null && tgtLang == null) [, srcLang, tgtLang] = pair;
    return {
      inputs: asList(inputs)[0],
      srcLang: srcLang ?? '',
      tgtLang: tgtLang ?? '',
      parameters: seq2seqParameters(params),
      cleanUpTokenizationSpaces: Boolean(params.cleanUpTokenizationSpaces),
    };
  },
  shape(response, inputs) {
    const perInput = response.results.map(({ translations }) =>
      translations.map((t) => ({ translation_text: t.translationText })),
    );
    return seq2seqShape(perInput, inputs);
  },
};

export const CODECS = [
  summarization,
  translation,
  textClassification,
  featureExtraction,
  tokenClassification,
  questionAnswering,
  fillMask,
  zeroShotClassification,
  imageClassification,
  textGeneration,
];

/** The codec for a task name or alias. */
export function codecFor(task) {
  if (task.startsWith('translation_')) return codecFor('translation');
  const codec = CODECS.find((c) => c.task === task || c.aliases.includes(task));
  if (!codec) {
    const known = CODECS.flatMap((c) => [c.task, ...c.aliases]).sort();
    throw new Error(`unknown task '${task}'; known: ${known.join(', ')}`);
  }
  return codec;
}
