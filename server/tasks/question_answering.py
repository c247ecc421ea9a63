"""question-answering: extractive answers, with the semantics of transformers 4.x's pipeline.

transformers 5 dropped the pipeline; this keeps its behaviour (parameters, defaults, span and
offset rules, output {score, start, end, answer}):

- The question (cut to `max_question_len` tokens) and the context become windows of at most
  `max_seq_len` tokens; a context that does not fit is split into overlapping windows sharing
  `doc_stride` tokens. All windows of all inputs of a batch run through the backend together
  (in chunks of the model's max_batch_size) and are regrouped per input afterwards.
- In each window the start and end logits are softmaxed over the context tokens (and the [CLS]
  token, whose start x end probability is the "no answer" score); a span's score is
  p_start x p_end, for spans of at most `max_answer_len` tokens inside the context.
- Each window's best spans are mapped to character offsets in the original context (widened to
  whole words with `align_to_words`); the same answer text found twice (in overlapping windows,
  say) counts once with the scores added; the best `top_k` over all windows are returned.
- With `handle_impossible_answer`, "no answer" ({start: 0, end: 0, answer: ""}) competes with
  the smallest no-answer score over the windows.

Two 4.x artefacts are not kept: where it let invalid spans through (zero-score spans ending
before they start, or starting on [CLS]) only real context spans are candidates here, and where
it widened a span to the part of a word inside the window (a word cut by the window's edge gave
"vably" for "unbelievably") the span is widened to the whole word of the context.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.feature_rows import run_in_chunks

DEFAULT_TOP_K = 1
DEFAULT_MAX_ANSWER_LEN = 15
DEFAULT_MAX_QUESTION_LEN = 64
DEFAULT_MAX_SEQ_LEN = 384
MAX_DOC_STRIDE = 128
# 4.x's "no answer yet" score: larger than any probability.
NO_NULL_SCORE = 1_000_000.0
# Masked logits: exp() of them vanishes next to any real token's.
MASKED_LOGIT = -10000.0


@dataclass(frozen=True)
class WindowParams:
    """Decides the windows, so inputs share a batch only when these are equal."""

    max_seq_len: int
    doc_stride: int
    max_question_len: int


@dataclass(frozen=True)
class AnswerParams:
    top_k: int
    max_answer_len: int
    handle_impossible_answer: bool
    align_to_words: bool


@dataclass
class Windows:
    """Every window of a batch: model tensors, their tokenizer encodings and the input each belongs to."""

    tensors: dict[str, Any]
    encodings: list[Any]
    owners: list[int]


class QuestionAnsweringTask(TokenizingTask):
    name = "question-answering"
    model_class = "AutoModelForQuestionAnswering"
    output_names = ("start_logits", "end_logits")

    def __init__(self, context):
        super().__init__(context)
        if not self.tokenizer.is_fast:
            raise ValueError(f"model {self.settings.name}: question-answering needs a fast tokenizer (for offsets)")
        # Right-padding tokenizers put the question first (BERT); left-padding ones the context.
        self.question_first = self.tokenizer.padding_side == "right"
        self.context_sequence = 1 if self.question_first else 0
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(pair=True)

    # -- parameters -------------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        max_seq_len = check_int("max_seq_len", params.get("max_seq_len", min(self.max_length, DEFAULT_MAX_SEQ_LEN)),
                                self.special_tokens + 2, self.max_length)
        doc_stride = check_int("doc_stride", params.get("doc_stride", min(max_seq_len // 2, MAX_DOC_STRIDE)), 0, max_seq_len)
        max_question_len = check_int("max_question_len", params.get("max_question_len", DEFAULT_MAX_QUESTION_LEN), 1)
        top_k = check_int("top_k", params.get("top_k", DEFAULT_TOP_K), 1)
        max_answer_len = check_int("max_answer_len", params.get("max_answer_len", DEFAULT_MAX_ANSWER_LEN), 1)
        flags = {}
        for key, default in (("handle_impossible_answer", False), ("align_to_words", True)):
            value = params.get(key, default)
            if not isinstance(value, bool):
                raise InvalidArgument(key, f"must be a boolean, got {value!r}")
            flags[key] = value
        return TaskParams(pre=WindowParams(max_seq_len, doc_stride, max_question_len),
                          post=AnswerParams(top_k, max_answer_len, **flags))

    def check_input(self, index: int, item: Any) -> None:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise InvalidArgument(f"inputs[{index}]", "must be a question and a context (strings)")
        for name, text in zip(("question", "context"), item):
            if not text:
                raise InvalidArgument(f"inputs[{index}].{name}", "must not be empty")

    def size(self, item: Any) -> int:
        return len(item[0]) + len(item[1])

    # -- windows ----------------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[tuple[str, str]], pre: WindowParams) -> Windows:
        questions, question_lengths = self._cut_questions([q for q, _ in inputs], pre.max_question_len)
        contexts = [c for _, c in inputs]
        # Counted alone, a long context exceeds the model's length: that is what windows are for.
        context_lengths = [len(ids) for ids in self.tokenizer(contexts, add_special_tokens=False, verbose=False)["input_ids"]]
        overflow = False
        for q_len, c_len in zip(question_lengths, context_lengths):
            room = pre.max_seq_len - q_len - self.special_tokens
            if room < 1:
                raise InvalidArgument("max_seq_len", f"{pre.max_seq_len} leaves no room for the context: the question "
                                      f"takes {q_len} tokens and the special tokens {self.special_tokens}")
            if c_len > room:
                overflow = True
                if pre.doc_stride >= room:
                    # The tokenizer would abort: a window could not move forward.
                    raise InvalidArgument("doc_stride", f"{pre.doc_stride} must be smaller than the {room} context tokens "
                                          f"a window holds (max_seq_len {pre.max_seq_len} - question {q_len} - "
                                          f"special tokens {self.special_tokens})")
        first, second = (questions, contexts) if self.question_first else (contexts, questions)
        encoded = self.tokenizer(
            first, second,
            truncation="only_second" if self.question_first else "only_first",
            max_length=pre.max_seq_len,
            # The stride only matters (and is only checked) where a context overflows.
            stride=pre.doc_stride if overflow else 0,
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
        )
        owners = encoded.pop("overflow_to_sample_mapping").tolist()
        return Windows(tensors=dict(encoded), encodings=list(encoded.encodings), owners=owners)

    def _cut_questions(self, questions: list[str], limit: int) -> tuple[list[str], list[int]]:
        """Questions cut to `limit` tokens (at the end of the last kept token), and their token counts."""
        encoded = self.tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        cut = list(questions)
        recount = []
        for i, ids in enumerate(encoded["input_ids"]):
            if len(ids) > limit:
                cut[i] = questions[i][: encoded["offset_mapping"][i][limit - 1][1]]
                recount.append(i)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        if recount:
            # A cut inside a word may tokenize differently: count again.
            again = self.tokenizer([cut[i] for i in recount], add_special_tokens=False)["input_ids"]
            for i, ids in zip(recount, again):
                lengths[i] = len(ids)
        return cut, lengths

    def forward(self, features: Windows, fwd: Hashable, instance) -> Any:
        return run_in_chunks(instance, features.tensors, self.settings.max_batch_size)

    # -- spans ------------------------------------------------------------------------------------

    def postprocess(self, inputs, features: Windows, outputs, posts: Sequence[AnswerParams]) -> list[Any]:
        starts = outputs["start_logits"].float().numpy()
        ends = outputs["end_logits"].float().numpy()
        attention = features.tensors["attention_mask"].numpy().astype(bool)
        input_ids = features.tensors["input_ids"].numpy()
        rows_of: dict[int, list[int]] = {}
        for row, owner in enumerate(features.owners):
            rows_of.setdefault(owner, []).append(row)
        results = []
        for i, ((_, context), post) in enumerate(zip(inputs, posts)):
            answers: list[dict[str, Any]] = []
            null_score = NO_NULL_SCORE
            words = self.context_words([features.encodings[row] for row in rows_of[i]]) if post.align_to_words else {}
            for row in rows_of[i]:
                encoding = features.encodings[row]
                in_context = np.array([s == self.context_sequence for s in encoding.sequence_ids]) & attention[row]
                scored = in_context.copy()
                if self.tokenizer.cls_token_id is not None:
                    scored |= (input_ids[row] == self.tokenizer.cls_token_id) & attention[row]
                p_start = _masked_softmax(starts[row], scored)
                p_end = _masked_softmax(ends[row], scored)
                if post.handle_impossible_answer:
                    null_score = min(null_score, float(p_start[0] * p_end[0]))
                p_start[0] = p_end[0] = 0.0
                candidates = post.top_k * 2 + 10 if post.align_to_words else post.top_k
                for s, e, score in best_spans(p_start, p_end, in_context, candidates, post.max_answer_len):
                    begin, finish = self.char_span(encoding, s, e, words)
                    text = context[begin:finish]
                    same = next((a for a in answers if a["answer"].lower() == text.lower()), None)
                    if same is not None:
                        same["score"] += score
                    else:
                        answers.append({"score": score, "start": begin, "end": finish, "answer": text})
            if post.handle_impossible_answer:
                answers.append({"score": null_score, "start": 0, "end": 0, "answer": ""})
            answers.sort(key=lambda a: a["score"], reverse=True)
            results.append(answers[: post.top_k])
        return results

    def context_words(self, encodings: list[Any]) -> dict[int, tuple[int, int]]:
        """Word index -> character span of the whole word in the context, over all windows of an
        input (a window's edge may cut a word; word indices count over the whole context)."""
        words: dict[int, tuple[int, int]] = {}
        for encoding in encodings:
            for word, sequence, (begin, end) in zip(encoding.word_ids, encoding.sequence_ids, encoding.offsets):
                if sequence == self.context_sequence and word is not None:
                    known = words.get(word)
                    words[word] = (begin, end) if known is None else (min(known[0], begin), max(known[1], end))
        return words

    @staticmethod
    def char_span(encoding: Any, start: int, end: int, words: dict[int, tuple[int, int]]) -> tuple[int, int]:
        """Character offsets in the context of tokens start..end, widened to whole words when
        `words` (from context_words) is given."""
        start_word, end_word = encoding.word_ids[start], encoding.word_ids[end]
        if words and start_word in words and end_word in words:
            return words[start_word][0], words[end_word][1]
        return encoding.offsets[start][0], encoding.offsets[end][1]


def _masked_softmax(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Softmax where the tokens outside `keep` get (practically) no probability, in float32 as 4.x."""
    masked = np.where(keep, logits, np.float32(MASKED_LOGIT)).astype(np.float32)
    exp = np.exp(masked - masked.max())
    return exp / exp.sum()


def best_spans(p_start: np.ndarray, p_end: np.ndarray, allowed: np.ndarray, k: int,
               max_answer_len: int) -> list[tuple[int, int, float]]:
    """The k best (start, end, p_start * p_end) spans with start <= end < start + max_answer_len,
    both ends on allowed tokens, best first."""
    scores = np.outer(p_start, p_end)
    # Keep start <= end and end - start < max_answer_len ...
    valid = np.triu(np.ones_like(scores, dtype=bool)) & ~np.triu(np.ones_like(scores, dtype=bool), max_answer_len)
    # ... on allowed tokens only.
    valid &= allowed[:, None] & allowed[None, :]
    flat = np.where(valid, scores, -1.0).ravel()
    count = min(k, int(valid.sum()))
    if count == 0:
        return []
    top = np.argpartition(-flat, count - 1)[:count] if count < flat.size else np.arange(flat.size)
    top = top[np.argsort(-flat[top], kind="stable")]
    width = scores.shape[1]
    return [(int(i // width), int(i % width), float(flat[i])) for i in top]
