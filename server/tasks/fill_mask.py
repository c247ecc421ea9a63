"""fill-mask: the likeliest tokens for each mask token, as transformers' FillMaskPipeline gives them.

Each input yields one list of predictions per mask token ({score, token, token_str, sequence}).
An input needs at least one mask token and at most `max_masks` (config.pbtxt
`parameters.defaults { key: "max_masks" }`, default 5): with several masks each one's
predictions are independent (the other masks stay masked), as in transformers. Parameters, with
transformers' names: top_k (0: no predictions), targets, and tokenizer_kwargs' truncation,
max_length and add_special_tokens (tokenization.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.tokenization import TokenizerOptions, tokenize, tokenizer_options

DEFAULT_TOP_K = 5
DEFAULT_MAX_MASKS = 5


@dataclass(frozen=True)
class FillMaskPost:
    top_k: int
    # Token ids the predictions are limited to, or None for the whole vocabulary.
    target_ids: tuple[int, ...] | None


class FillMaskTask(TokenizingTask):
    name = "fill-mask"
    model_class = "AutoModelForMaskedLM"
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"model {self.settings.name}: its tokenizer has no mask token, so it cannot serve fill-mask")
        self.mask_token: str = self.tokenizer.mask_token
        self.vocab_size = int(getattr(context.hf_config, "vocab_size", 0) or len(self.tokenizer))
        self.max_masks = check_int("parameters.defaults.max_masks", self.defaults().get("max_masks", DEFAULT_MAX_MASKS), 1)

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        # More than the vocabulary is an error in transformers too (torch's topk refuses it).
        top_k = check_int("top_k", params.get("top_k", DEFAULT_TOP_K), 0, self.vocab_size)
        targets = params.get("targets") or None
        target_ids = self.target_ids(targets) if targets is not None else None
        if target_ids is not None:
            top_k = min(top_k, len(target_ids))
        return TaskParams(pre=tokenizer_options(params, self.max_length), post=FillMaskPost(top_k, target_ids))

    def target_ids(self, targets: Any) -> tuple[int, ...]:
        """Vocabulary ids of the targets; a target outside the vocabulary stands for its first token."""
        if isinstance(targets, str):
            targets = [targets]
        if not all(isinstance(t, str) for t in targets):
            raise InvalidArgument("targets", "must be a list of strings")
        vocab = self.tokenizer.get_vocab()
        ids = []
        for target in targets:
            token_id = vocab.get(target)
            if token_id is None:
                pieces = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                        return_token_type_ids=False, max_length=1, truncation=True)["input_ids"]
                if not pieces:
                    continue  # nothing to stand for it (e.g. only whitespace): transformers skips it too
                token_id = pieces[0]
            ids.append(token_id)
        if not ids:
            raise InvalidArgument("targets", f"none of {list(targets)!r} maps to a token of the vocabulary")
        return tuple(sorted(set(ids)))

    def check_input(self, index: int, item: Any) -> None:
        super().check_input(index, item)
        count = item.count(self.mask_token)
        if count == 0:
            raise InvalidArgument(f"inputs[{index}]", f"has no mask token {self.mask_token}")
        if count > self.max_masks:
            raise InvalidArgument(f"inputs[{index}]", f"has {count} mask tokens; this model accepts at most {self.max_masks}")

    def preprocess(self, inputs: Sequence[str], pre: TokenizerOptions) -> Any:
        encoded = tokenize(self, inputs, options=pre)
        counts = (encoded["input_ids"] == self.tokenizer.mask_token_id).sum(dim=1)
        for count in counts.tolist():
            # check_input counted the mask token's text; this counts the tokens the model sees
            # (truncation may have cut a mask off).
            if count == 0 or count > self.max_masks:
                # "input": the server relabels it with the input's index in the client's request.
                raise InvalidArgument(
                    "input", f"has {count} mask tokens after tokenization (cut to {self.max_length} tokens); "
                    f"it needs 1 to {self.max_masks}")
        return encoded

    def postprocess(self, inputs, features, outputs, posts: Sequence[FillMaskPost]) -> list[Any]:
        logits = outputs["logits"]
        results = []
        for i, post in enumerate(posts):
            length = int(features["attention_mask"][i].sum())
            input_ids = features["input_ids"][i][:length]
            results.append(self._predict(input_ids, logits[i][:length].float(), post))
        return results

    def _predict(self, input_ids: torch.Tensor, logits: torch.Tensor, post: FillMaskPost) -> list[list[dict[str, Any]]]:
        """One list of predictions per mask token, best first."""
        positions = torch.nonzero(input_ids == self.tokenizer.mask_token_id).squeeze(-1)
        probs = logits[positions].softmax(dim=-1)
        if post.target_ids is not None:
            probs = probs[:, list(post.target_ids)]
        values, indices = probs.topk(post.top_k)
        single_mask = len(positions) == 1
        pad = self.tokenizer.pad_token_id
        per_mask = []
        for position, mask_values, mask_indices in zip(positions.tolist(), values.tolist(), indices.tolist()):
            predictions = []
            for score, index in zip(mask_values, mask_indices):
                token = post.target_ids[index] if post.target_ids is not None else index
                filled = input_ids.clone()
                filled[position] = token
                if pad is not None:
                    filled = filled[filled != pad]
                # With several masks the others stay visible in the sequence (as [MASK]),
                # so special tokens are kept, as transformers does.
                predictions.append({
                    "score": score,
                    "token": token,
                    "token_str": self.tokenizer.decode([token]),
                    "sequence": self.tokenizer.decode(filled.tolist(), skip_special_tokens=single_mask),
                })
            per_mask.append(predictions)
        return per_mask
