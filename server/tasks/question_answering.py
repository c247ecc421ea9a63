"""question-answering: extractive answers, with the semantics of transformers 4.x's pipeline.

transformers 5 dropped the pipeline; this keeps its behaviour with a fast tokenizer (parameters,
defaults, span and offset rules, output {score, start, end, answer}):

- The question and the context become windows of at most `max_seq_len` tokens; a context that
  does not fit is split into overlapping windows sharing `doc_stride` tokens (the question is never
  cut: 4.x's fast-tokenizer path takes `max_question_len` and ignores it, and so does this). All
  windows of all inputs of a batch run through the backend together (in chunks of the model's
  max_batch_size) and are regrouped per input afterwards.
- In each window the start and end logits are softmaxed over the context tokens (and the [CLS]
  token, whose start x end probability is the "no answer" score); a span's score is
  p_start x p_end, for spans of at most `max_answer_len` tokens inside the context.
- Each window's best spans are mapped to character offsets in the original context, widened with
  `align_to_words` to the words they touch as the window holds them (a word cut by the window's
  edge widens to its part inside the window, as in 4.x); the same answer text found twice (in
  overlapping windows, say) counts once with the scores added; the best `top_k` over all windows
  are returned.
- With `handle_impossible_answer`, "no answer" ({start: 0, end: 0, answer: ""}) competes with
  the smallest no-answer score over the windows.

One 4.x artefact is not kept: where a window has fewer real spans than the candidates it looks at
(top_k * 2 + 10 with align_to_words), 4.x fills up with zero-score spans that end before they start
or start on [CLS] (empty or odd answers, chosen by how numpy breaks ties); only real context spans
are candidates here, so such a request returns fewer answers.
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
        # Checked, and then of no effect, as in 4.x with a fast tokenizer (see above).
        check_int("max_question_len", params.get("max_question_len", DEFAULT_MAX_QUESTION_LEN), 1)
        top_k = check_int("top_k", params.get("top_k", DEFAULT_TOP_K), 1)
        max_answer_len = check_int("max_answer_len", params.get("max_answer_len", DEFAULT_MAX_ANSWER_LEN), 1)
        flags = {}
        for key, default in (("handle_impossible_answer", False), ("align_to_words", True)):
            value = params.get(key, default)
            if not isinstance(value, bool):
                raise InvalidArgument(key, f"must be a boolean, got {value!r}")
            flags[key] = value
        return TaskParams(pre=WindowParams(max_seq_len, doc_stride),
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
        questions = [q for q, _ in inputs]
        question_lengths = [len(ids) for ids in self.tokenizer(questions, add_special_tokens=False, verbose=False)["input_ids"]]
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
                    begin, finish = self.char_span(encoding, s, e, post.align_to_words, self.context_sequence)
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

    @staticmethod
    def char_span(encoding: Any, start: int, end: int, align_to_words: bool, sequence: int) -> tuple[int, int]:
        """Character offsets in the context of tokens start..end; with align_to_words, of the words
        they belong to as this window's encoding knows them (4.x's get_indices)."""
        if align_to_words:
            start_word, end_word = encoding.token_to_word(start), encoding.token_to_word(end)
            if start_word is not None and end_word is not None:
                first = encoding.word_to_chars(start_word, sequence_index=sequence)
                last = encoding.word_to_chars(end_word, sequence_index=sequence)
                if first is not None and last is not None:
                    return first[0], last[1]
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
