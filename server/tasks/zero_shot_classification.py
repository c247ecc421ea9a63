"""zero-shot-classification: labels chosen per request, scored by an NLI model.

As in transformers' ZeroShotClassificationPipeline, each input is paired with one hypothesis per
candidate label ("This example is {label}."), the NLI model scores every pair, and the
entailment logits become the labels' scores: a softmax across the labels, or, with
multi_label (or a single label), entailment against contradiction for each label on its own.
An input thus expands into one feature row per label; the rows of a batch run through the
backend in chunks of the model's max_batch_size and are regrouped per input afterwards.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask
from pipeserve.server.tasks.feature_rows import run_in_chunks

log = logging.getLogger("pipeserve.tasks")

DEFAULT_TEMPLATE = "This example is {}."
MAX_CANDIDATE_LABELS = 1024


@dataclass(frozen=True)
class ZeroShotPre:
    labels: tuple[str, ...]
    template: str


@dataclass
class ZeroShotFeatures:
    """One row per (input, label) pair, inputs outermost."""

    tensors: dict[str, Any]
    labels: tuple[str, ...]


def check_template(template: str) -> None:
    """The template may only hold plain "{}" (or "{0}") slots: a format spec such as
    "{:>999999999}" would let a request allocate gigabytes, and other fields cannot be filled."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise InvalidArgument("hypothesis_template", f"{template!r} is not a valid format string: {exc}") from None
    if not fields:
        raise InvalidArgument("hypothesis_template", f"{template!r} has no {{}} where the label goes")
    if any(name not in ("", "0") or spec or conversion for name, spec, conversion in fields):
        raise InvalidArgument("hypothesis_template", f"{template!r} may only hold {{}} slots for the label")


class ZeroShotClassificationTask(TokenizingTask):
    name = "zero-shot-classification"
    model_class = "AutoModelForSequenceClassification"
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        label2id = getattr(context.hf_config, "label2id", None) or {}
        self.entailment_id = next((int(i) for label, i in label2id.items() if label.lower().startswith("entail")), -1)
        if self.entailment_id == -1:
            # transformers goes on with the last label; so do we, but say so.
            log.warning("model %s: no label of label2id %s starts with 'entail'; using the last label as entailment",
                        self.settings.name, dict(label2id))
        self.contradiction_id = -1 if self.entailment_id == 0 else 0

    # -- parameters -------------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        labels = params.get("candidate_labels")
        if isinstance(labels, str):  # "a, b, c", as transformers accepts
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        if not labels:
            raise InvalidArgument("candidate_labels", "must hold at least one label")
        if not all(isinstance(label, str) for label in labels):
            raise InvalidArgument("candidate_labels", "must be strings")
        if len(labels) > MAX_CANDIDATE_LABELS:
            raise InvalidArgument("candidate_labels", f"holds {len(labels)} labels; at most {MAX_CANDIDATE_LABELS}")
        template = params.get("hypothesis_template") or DEFAULT_TEMPLATE
        if not isinstance(template, str):
            raise InvalidArgument("hypothesis_template", "must be a string")
        check_template(template)
        multi_label = params.get("multi_label", False)
        if not isinstance(multi_label, bool):
            raise InvalidArgument("multi_label", "must be a boolean")
        # The labels and template decide the features, so they decide which inputs share a batch.
        return TaskParams(pre=ZeroShotPre(tuple(labels), template), post=multi_label)

    # -- steps ------------------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[str], pre: ZeroShotPre) -> ZeroShotFeatures:
        hypotheses = [pre.template.format(label) for label in pre.labels]
        premises = [text for text in inputs for _ in hypotheses]
        pairs = hypotheses * len(inputs)
        if self.reject_overlong:
            lengths = self.tokenizer(premises, pairs, truncation=False, return_length=True)["length"]
            for n in lengths:
                if n > self.max_length:
                    raise InvalidArgument("input", f"with a hypothesis it has {n} tokens but the model accepts "
                                          f"at most {self.max_length} (truncation: TRUNCATION_REJECT); shorten it")
        try:
            # Only the input is truncated, never the hypothesis (which carries the label).
            encoded = self.tokenizer(premises, pairs, padding=True, truncation="only_first",
                                     max_length=self.max_length, return_tensors="pt")
        except Exception as exc:
            if "too short" not in str(exc):
                raise
            raise InvalidArgument("hypothesis_template", f"a hypothesis leaves no room for the input within "
                                  f"{self.max_length} tokens; use shorter labels or template") from None
        return ZeroShotFeatures(dict(encoded), pre.labels)

    def forward(self, features: ZeroShotFeatures, fwd: Hashable, instance) -> Any:
        return run_in_chunks(instance, features.tensors, self.settings.max_batch_size)

    def postprocess(self, inputs, features: ZeroShotFeatures, outputs, posts: Sequence[bool]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        grouped = logits.reshape(len(inputs), len(features.labels), -1)
        return [self._scores(text, features.labels, grouped[i], multi_label)
                for i, (text, multi_label) in enumerate(zip(inputs, posts))]

    def _scores(self, sequence: str, labels: tuple[str, ...], logits: np.ndarray, multi_label: bool) -> dict[str, Any]:
        if multi_label or len(labels) == 1:
            pair = logits[:, [self.contradiction_id, self.entailment_id]]
            scores = (np.exp(pair) / np.exp(pair).sum(-1, keepdims=True))[:, 1]
        else:
            entail = logits[:, self.entailment_id]
            scores = np.exp(entail) / np.exp(entail).sum(-1, keepdims=True)
        order = list(reversed(scores.argsort()))
        return {"sequence": sequence, "labels": [labels[i] for i in order], "scores": [float(scores[i]) for i in order]}
