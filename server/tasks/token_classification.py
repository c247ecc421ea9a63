"""token-classification (alias ner): a label per token, or entities fused from tokens.

The output follows transformers' TokenClassificationPipeline: without aggregation one entity per
token ({entity, score, index, word, start, end}); with an aggregation strategy, entity groups
({entity_group, score, word, start, end}) built by the B-/I- tagging scheme, where the
word-level strategies (first, average, max) first make every token of a word agree.

An input is a text, or with is_split_into_words a list of words (its text: the words joined by
`delimiter`, which start and end index); either may come as {"input": ..., "offset_mapping":
[(start, end), ...]} to give its tokens their character spans (transformers' offset_mapping). With
`stride`, a text longer than the model's maximum is labelled in overlapping windows of that
length, as transformers does: each window's entities are found on their own, and where windows
overlap the longer (then the better scored) entity wins. Windows of all inputs of a batch run
through the backend together, in chunks of the model's max_batch_size (feature_rows.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.class_labels import class_labels
from pipeserve.server.tasks.feature_rows import run_in_chunks
from pipeserve.server.tasks.text_classification import softmax

log = logging.getLogger("pipeserve.tasks")

STRATEGIES = ("none", "simple", "first", "average", "max")
WORD_STRATEGIES = ("first", "average", "max")
DEFAULT_IGNORE_LABELS = ("O",)
# Windows one input may take with `stride` (each is a forward pass of the model's full length):
# a stride just under the window length would otherwise turn one long text into thousands.
MAX_WINDOWS_PER_INPUT = 256
# Offsets past any text a request can carry; a pre-split input's are shifted by their word's place,
# and the sum must still fit the wire's int32.
MAX_OFFSET = 2**30


@dataclass(frozen=True)
class TokenPre:
    """What decides the tokenization, so inputs share a batch only when these are equal."""

    split_into_words: bool = False
    delimiter: str = " "
    stride: int | None = None


@dataclass(frozen=True)
class TokenPost:
    strategy: str
    ignore_labels: tuple[str, ...]


@dataclass
class TokenFeatures:
    """The tensors the model sees (one row per input, or per window with a stride), and what
    postprocessing needs to map tokens back to text."""

    tensors: dict[str, Any]
    offsets: Any  # [rows, tokens, 2] character offsets, or None without a fast tokenizer
    special: Any  # [rows, tokens] 1 for special and padding tokens
    owners: list[int]  # the input of each row
    sentences: list[str]  # each input's text
    word_ids: list[list[int | None]] | None  # per row, each token's word (split inputs only)
    word_spans: list[list[tuple[int, int]]] | None  # per input, each word's characters in its text
    user_offsets: list[list[tuple[int, int]] | None]  # per input, the offset_mapping it came with


@dataclass
class PreEntity:
    word: str
    scores: np.ndarray
    start: int | None
    end: int | None
    index: int
    is_subword: bool


def input_parts(item: Any) -> tuple[Any, Any]:
    """(text or words, offset_mapping or None) of an input."""
    if isinstance(item, dict):
        return item.get("input"), item.get("offset_mapping")
    return item, None


class TokenClassificationTask(TokenizingTask):
    name = "token-classification"
    aliases = ("ner",)
    model_class = "AutoModelForTokenClassification"
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        self.labels = class_labels(context)
        backend = getattr(self.tokenizer, "_tokenizer", None)
        # WordPiece ("##") and BPE models with a continuing-subword prefix mark subwords exactly;
        # other tokenizers fall back to "no space before it" (as transformers does).
        self.marks_subwords = bool(backend is not None and getattr(backend.model, "continuing_subword_prefix", None))

    # -- parameters -------------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        asked = params.get("aggregation_strategy")
        if asked is not None and (not isinstance(asked, str) or asked.lower() not in STRATEGIES):
            raise InvalidArgument("aggregation_strategy", f"must be one of {', '.join(STRATEGIES)}, got {asked!r}")
        strategy = asked.lower() if asked is not None else "none"
        if strategy in WORD_STRATEGIES and not self.tokenizer.is_fast:
            raise InvalidArgument("aggregation_strategy", f"{strategy!r} needs a fast tokenizer; this model's is slow; use 'simple'")
        ignore = params.get("ignore_labels")
        if ignore is None:
            ignore = DEFAULT_IGNORE_LABELS
        if isinstance(ignore, str) or not isinstance(ignore, (list, tuple)) or not all(isinstance(label, str) for label in ignore):
            raise InvalidArgument("ignore_labels", "must be a list of label names")
        split = params.get("is_split_into_words", False)
        if not isinstance(split, bool):
            raise InvalidArgument("is_split_into_words", f"must be a boolean, got {split!r}")
        if split and not self.tokenizer.is_fast:
            raise InvalidArgument("is_split_into_words", "needs a fast tokenizer; this model's is slow")
        delimiter = params.get("delimiter")
        if delimiter is None:
            delimiter = " "
        if not isinstance(delimiter, str):
            raise InvalidArgument("delimiter", f"must be a string, got {delimiter!r}")
        stride = params.get("stride")
        if stride is not None:
            stride = self._checked_stride(stride, asked)
        return TaskParams(pre=TokenPre(split, delimiter if split else " ", stride),
                          post=TokenPost(strategy, tuple(ignore)))

    def _checked_stride(self, stride: Any, strategy: str | None) -> int:
        """transformers' rules: below the model's length, with a fast tokenizer, and not with the
        aggregation strategy "none" asked for explicitly (unset is allowed)."""
        stride = check_int("stride", stride, 0)
        if stride >= self.max_length:
            raise InvalidArgument("stride", f"is {stride} but must be less than the model's {self.max_length} tokens "
                                  "(less the special tokens)")
        if strategy is not None and strategy.lower() == "none":
            raise InvalidArgument("stride", 'labels a long text in windows, which aggregation_strategy "none" cannot '
                                  "merge; choose simple, first, average or max")
        if not self.tokenizer.is_fast:
            raise InvalidArgument("stride", "needs a fast tokenizer; this model's is slow")
        return stride

    def check_input(self, index: int, item: Any) -> None:
        content, offsets = input_parts(item)
        field = f"inputs[{index}]"
        words = isinstance(content, (list, tuple))
        if words and not all(isinstance(w, str) for w in content) or not words and not isinstance(content, str):
            raise InvalidArgument(field, "must be a string, or a list of words (strings) with is_split_into_words")
        if words and not content:
            raise InvalidArgument(field, "has no words")
        if offsets is not None:
            if not isinstance(offsets, (list, tuple)) or not all(
                    isinstance(span, (list, tuple)) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_OFFSET for x in span)
                    and span[0] <= span[1] for span in offsets):
                raise InvalidArgument(f"{field}.offset_mapping", "must be (start, end) pairs of character offsets, "
                                      f"0 <= start <= end <= {MAX_OFFSET}")

    def size(self, item: Any) -> int:
        content, _ = input_parts(item)
        return len(content) if isinstance(content, str) else sum(len(w) + 1 for w in content)

    # -- steps ------------------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[Any], pre: TokenPre) -> TokenFeatures:
        contents, user_offsets = zip(*(input_parts(item) for item in inputs))
        for content in contents:
            if isinstance(content, str) == pre.split_into_words:
                raise InvalidArgument("input", "must be a list of words, as is_split_into_words is set" if pre.split_into_words
                                      else "must be a string (a list of words needs is_split_into_words)")
        word_spans = None
        if pre.split_into_words:
            sentences, word_spans = zip(*(_join(words, pre.delimiter) for words in contents))
            contents = [list(words) for words in contents]
        else:
            sentences = contents
        fast = self.tokenizer.is_fast
        kwargs = {"return_special_tokens_mask": True, "return_offsets_mapping": fast,
                  "is_split_into_words": pre.split_into_words}
        if pre.stride is None:
            encoded = self.tokenize(contents, **kwargs)
            owners = list(range(len(inputs)))
        else:
            if any(offsets is not None for offsets in user_offsets):
                raise InvalidArgument("input.offset_mapping", "gives the spans of one tokenization of the input; with a "
                                      "stride it is cut into windows: send offset_mapping or stride, not both")
            self._check_windows(contents, pre)
            try:
                encoded = self.tokenizer(contents, truncation=True, max_length=self.max_length, stride=pre.stride,
                                         return_overflowing_tokens=True, padding=True, return_tensors="pt", **kwargs)
            except Exception as exc:  # the tokenizers library says why a stride does not fit, with many types
                raise InvalidArgument("stride", f"{pre.stride} does not fit windows of {self.max_length} tokens: {exc}") from None
            owners = encoded.pop("overflow_to_sample_mapping").tolist()
        word_ids = [encoded.word_ids(row) for row in range(len(owners))] if pre.split_into_words else None
        offsets = encoded.pop("offset_mapping", None)
        special = encoded.pop("special_tokens_mask")
        return TokenFeatures(tensors=dict(encoded), offsets=offsets, special=special, owners=owners,
                             sentences=list(sentences), word_ids=word_ids,
                             word_spans=list(word_spans) if word_spans is not None else None,
                             user_offsets=list(user_offsets))

    def _check_windows(self, contents: Sequence[Any], pre: TokenPre) -> None:
        """Refuses an input that `stride` would cut into more than MAX_WINDOWS_PER_INPUT windows."""
        lengths = self.tokenizer(list(contents), add_special_tokens=False, is_split_into_words=pre.split_into_words,
                                 verbose=False)["input_ids"]
        special = self.tokenizer.num_special_tokens_to_add()
        room = self.max_length - special
        for ids in lengths:
            if len(ids) > room:
                if pre.stride >= room:
                    # The tokenizers library would panic (an exception no `except Exception` catches).
                    raise InvalidArgument("stride", f"{pre.stride} must be less than the {room} tokens a window holds "
                                          f"(the model's {self.max_length} less {special} special tokens)")
                windows = 1 + math.ceil((len(ids) - room) / (room - pre.stride))
                if windows > MAX_WINDOWS_PER_INPUT:
                    raise InvalidArgument("input", f"has {len(ids)} tokens: windows of {room} that share {pre.stride} "
                                          f"would make {windows} windows, at most {MAX_WINDOWS_PER_INPUT}; "
                                          "use a smaller stride or a shorter text")

    def forward(self, features: TokenFeatures, fwd: Any, instance) -> Any:
        return run_in_chunks(instance, features.tensors, self.settings.max_batch_size)

    def postprocess(self, inputs, features: TokenFeatures, outputs, posts: Sequence[TokenPost]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        input_ids = features.tensors["input_ids"].numpy()
        special = features.special.numpy()
        mask = features.tensors["attention_mask"].numpy().astype(bool)
        offsets = features.offsets.numpy() if features.offsets is not None else None
        rows_of: dict[int, list[int]] = {}
        for row, owner in enumerate(features.owners):
            rows_of.setdefault(owner, []).append(row)
        results = []
        for i, post in enumerate(posts):
            sentence = features.sentences[i]
            user_offsets = features.user_offsets[i]
            entities: list[dict[str, Any]] = []
            for row in rows_of[i]:
                keep = mask[row]
                if user_offsets is not None:
                    row_offsets = self._user_offsets(user_offsets, int(keep.sum()), sentence)
                else:
                    row_offsets = offsets[row][keep] if offsets is not None else None
                word_ids = None
                if features.word_ids is not None:
                    word_ids = [w for w, kept in zip(features.word_ids[row], keep) if kept]
                pre_entities = self.gather_pre_entities(
                    sentence, input_ids[row][keep], softmax(logits[row][keep]), row_offsets, special[row][keep],
                    post.strategy, word_ids, features.word_spans[i] if features.word_spans is not None else None,
                )
                entities.extend(e for e in self.aggregate(pre_entities, post.strategy)
                                if e.get("entity") not in post.ignore_labels
                                and e.get("entity_group") not in post.ignore_labels)
            if len(rows_of[i]) > 1:
                entities = aggregate_overlapping_entities(entities)
            results.append(entities)
        return results

    @staticmethod
    def _user_offsets(spans: Sequence[Sequence[int]], tokens: int, sentence: str) -> list[tuple[int, int]]:
        if len(spans) < tokens:
            raise InvalidArgument("input.offset_mapping", f"has {len(spans)} spans but the input has {tokens} tokens "
                                  "(special tokens included)")
        return [(int(a), int(b)) for a, b in spans[:tokens]]

    # -- tokens to entities -----------------------------------------------------------------------

    def gather_pre_entities(self, sentence: str, input_ids: np.ndarray, scores: np.ndarray, offsets: Any,
                            special: np.ndarray, strategy: str, word_ids: list[int | None] | None = None,
                            word_spans: list[tuple[int, int]] | None = None) -> list[PreEntity]:
        """One PreEntity per real (non-special) token, with its text span and whether it continues a
        word. Pre-split inputs have offsets within each word: they are moved to the word's place."""
        entities = []
        for idx, token_scores in enumerate(scores):
            if special[idx]:
                continue
            token_id = int(input_ids[idx])
            word = self.tokenizer.convert_ids_to_tokens(token_id)
            start: int | None = None
            end: int | None = None
            is_subword = False
            if offsets is not None:
                start, end = int(offsets[idx][0]), int(offsets[idx][1])
                if word_ids is not None and word_spans is not None and word_ids[idx] is not None:
                    shift = word_spans[word_ids[idx]][0]
                    start, end = start + shift, end + shift
                text = sentence[start:end]
                if self.marks_subwords:
                    # "##ing" is longer than "ing" in the text: the prefix marks a continuation.
                    is_subword = len(word) != len(text)
                else:
                    is_subword = start > 0 and " " not in sentence[start - 1 : start + 1]
                if token_id == self.tokenizer.unk_token_id:
                    word, is_subword = text, False
            entities.append(PreEntity(word, token_scores, start, end, idx, is_subword))
        return entities

    def aggregate(self, pre_entities: list[PreEntity], strategy: str) -> list[dict[str, Any]]:
        if strategy in ("none", "simple"):
            entities = []
            for pre in pre_entities:
                best = int(pre.scores.argmax())
                entities.append({"entity": self.labels[best], "score": float(pre.scores[best]), "index": pre.index,
                                 "word": pre.word, "start": pre.start, "end": pre.end})
        else:
            entities = [self.aggregate_word(group, strategy) for group in _words(pre_entities)]
        return entities if strategy == "none" else self.group_entities(entities)

    def aggregate_word(self, tokens: list[PreEntity], strategy: str) -> dict[str, Any]:
        """One entity for a whole word, so that its tokens cannot disagree."""
        if strategy == "first":
            scores = tokens[0].scores
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t.scores.max()).scores
        else:  # average
            scores = np.nanmean(np.stack([t.scores for t in tokens]), axis=0)
        best = int(scores.argmax())
        return {
            "entity": self.labels[best],
            "score": float(scores[best]),
            "word": self.tokenizer.convert_tokens_to_string([t.word for t in tokens]),
            "start": tokens[0].start,
            "end": tokens[-1].end,
        }

    def group_entities(self, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Fuses adjacent entities of the same tag; a B- tag always opens a new group."""
        groups: list[dict[str, Any]] = []
        current: list[dict[str, Any]] = []
        for entity in entities:
            if current:
                bi, tag = _split_tag(entity["entity"])
                _, last_tag = _split_tag(current[-1]["entity"])
                if tag != last_tag or bi == "B":
                    groups.append(self._group(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._group(current))
        return groups

    def _group(self, entities: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean(np.array([e["score"] for e in entities], dtype=np.float32))),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }


def _words(tokens: list[PreEntity]) -> list[list[PreEntity]]:
    """Groups tokens into words: a token that is a subword joins the word before it."""
    words: list[list[PreEntity]] = []
    for token in tokens:
        if words and token.is_subword:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _split_tag(label: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; a label outside the B-/I- scheme counts as a continuation."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _join(words: Sequence[str], delimiter: str) -> tuple[str, list[tuple[int, int]]]:
    """The text of a pre-split input and each word's characters in it."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + len(delimiter)
    return delimiter.join(words), spans


def aggregate_overlapping_entities(entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entities of overlapping windows, merged as transformers merges them: in text order, of two
    that overlap the longer one stays, or with equal lengths the better scored."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    merged = []
    previous = entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or length == previous_length and entity["score"] > previous["score"]:
                previous = entity
        else:
            merged.append(previous)
            previous = entity
    merged.append(previous)
    return merged
