"""token-classification (alias ner): a label per token, or entities fused from tokens.

The output follows transformers' TokenClassificationPipeline: without aggregation one entity per
token ({entity, score, index, word, start, end}); with an aggregation strategy, entity groups
({entity_group, score, word, start, end}) built by the B-/I- tagging scheme, where the
word-level strategies (first, average, max) first make every token of a word agree.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask
from pipeserve.server.tasks.class_labels import class_labels
from pipeserve.server.tasks.text_classification import softmax

log = logging.getLogger("pipeserve.tasks")

STRATEGIES = ("none", "simple", "first", "average", "max")
WORD_STRATEGIES = ("first", "average", "max")
DEFAULT_IGNORE_LABELS = ("O",)


@dataclass(frozen=True)
class TokenPost:
    strategy: str
    ignore_labels: tuple[str, ...]


@dataclass
class TokenFeatures:
    """The tensors the model sees, and what postprocessing needs to map tokens back to text."""

    tensors: dict[str, Any]
    offsets: Any  # [batch, tokens, 2] character offsets, or None without a fast tokenizer
    special: Any  # [batch, tokens] 1 for special and padding tokens


@dataclass
class PreEntity:
    word: str
    scores: np.ndarray
    start: int | None
    end: int | None
    index: int
    is_subword: bool


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
        strategy = params.get("aggregation_strategy") or "none"
        if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
            raise InvalidArgument("aggregation_strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        strategy = strategy.lower()
        if strategy in WORD_STRATEGIES and not self.tokenizer.is_fast:
            raise InvalidArgument("aggregation_strategy", f"{strategy!r} needs a fast tokenizer; this model's is slow; use 'simple'")
        ignore = params.get("ignore_labels")
        if ignore is None:
            ignore = DEFAULT_IGNORE_LABELS
        if isinstance(ignore, str) or not all(isinstance(label, str) for label in ignore):
            raise InvalidArgument("ignore_labels", "must be a list of label names")
        return TaskParams(post=TokenPost(strategy, tuple(ignore)))

    # -- steps ------------------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[str], pre: Hashable) -> TokenFeatures:
        fast = self.tokenizer.is_fast
        encoded = self.tokenize(inputs, return_special_tokens_mask=True, return_offsets_mapping=fast)
        offsets = encoded.pop("offset_mapping", None)
        special = encoded.pop("special_tokens_mask")
        return TokenFeatures(tensors=dict(encoded), offsets=offsets, special=special)

    def forward(self, features: TokenFeatures, fwd: Hashable, instance) -> Any:
        return instance.run(features.tensors)

    def postprocess(self, inputs, features: TokenFeatures, outputs, posts: Sequence[TokenPost]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        input_ids = features.tensors["input_ids"].numpy()
        special = features.special.numpy()
        mask = features.tensors["attention_mask"].numpy()
        offsets = features.offsets.numpy() if features.offsets is not None else None
        results = []
        for i, (sentence, post) in enumerate(zip(inputs, posts)):
            keep = mask[i].astype(bool)
            pre_entities = self.gather_pre_entities(
                sentence, input_ids[i][keep], softmax(logits[i][keep]),
                offsets[i][keep] if offsets is not None else None, special[i][keep], post.strategy,
            )
            entities = self.aggregate(pre_entities, post.strategy)
            results.append([e for e in entities
                            if e.get("entity") not in post.ignore_labels and e.get("entity_group") not in post.ignore_labels])
        return results

    # -- tokens to entities -----------------------------------------------------------------------

    def gather_pre_entities(self, sentence: str, input_ids: np.ndarray, scores: np.ndarray, offsets: np.ndarray | None,
                            special: np.ndarray, strategy: str) -> list[PreEntity]:
        """One PreEntity per real (non-special) token, with its text span and whether it continues a word."""
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
