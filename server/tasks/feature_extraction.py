"""feature-extraction: token-level hidden states as transformers returns them, or pooled vectors.

Parameters: transformers' truncation and tokenize_kwargs' truncation, max_length and
add_special_tokens (tokenization.py); pipeserve's own pooling (none, mean, cls, max) and normalize.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask
from pipeserve.server.tasks.tokenization import TokenizerOptions, tokenize, tokenizer_options

POOLINGS = ("none", "mean", "cls", "max")


@dataclass(frozen=True)
class EmbeddingPost:
    pooling: str
    normalize: bool


@dataclass(frozen=True)
class Embedding:
    """One input's result: its token vectors [tokens, hidden] or pooled vector [hidden], and the
    number of tokens it was (what an API's usage counts)."""

    vector: torch.Tensor
    tokens: int


class FeatureExtractionTask(TokenizingTask):
    name = "feature-extraction"
    model_class = "AutoModel"
    output_names = ("last_hidden_state",)

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        pooling = params.get("pooling") or "none"
        if pooling not in POOLINGS:
            raise InvalidArgument("pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        normalize = params.get("normalize", False)
        if not isinstance(normalize, bool):
            raise InvalidArgument("normalize", "must be a boolean")
        return TaskParams(pre=tokenizer_options(params, self.max_length), post=EmbeddingPost(pooling, normalize))

    def preprocess(self, inputs: Sequence[str], pre: TokenizerOptions) -> Any:
        return tokenize(self, inputs, options=pre)

    def postprocess(self, inputs, features, outputs, posts: Sequence[EmbeddingPost]) -> list[Embedding]:
        hidden = outputs["last_hidden_state"].float()
        mask = features["attention_mask"]
        results = []
        for i, post in enumerate(posts):
            # Cut each row back to its own tokens: padding is an artefact of batching.
            tokens = hidden[i][mask[i].bool()]
            if post.pooling == "mean":
                vector = tokens.mean(dim=0)
            elif post.pooling == "cls":
                vector = tokens[0]
            elif post.pooling == "max":
                vector = tokens.max(dim=0).values
            else:
                vector = tokens
            if post.normalize:
                vector = torch.nn.functional.normalize(vector, p=2, dim=-1)
            results.append(Embedding(vector.contiguous(), tokens.shape[0]))
        return results
