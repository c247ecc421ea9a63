"""translation: transformers 4.x TranslationPipeline semantics ({"translation_text": ...} per output).

The languages come from the request (src_lang, tgt_lang; the SDK turns the task name
"translation_en_to_fr" into them), else from config.pbtxt's parameters.defaults. Then, as in
transformers:
- a model with `task_specific_params["translation_<src>_to_<tgt>"]` (T5) gets that entry's prefix
  ("translate English to French: ") and generation settings; a pair it lacks is INVALID_ARGUMENT;
- a multilingual tokenizer (M2M100, NLLB, mBART) builds the inputs for the pair and forces the
  target language's first token;
- any other model (Marian: one direction per model) ignores the languages.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.registry import translation_languages
from pipeserve.server.tasks.text2text import Text2TextTask


class TranslationTask(Text2TextTask):
    name = "translation"
    result_key = "translation_text"
    task_parameters = frozenset({"src_lang", "tgt_lang", "task"})

    def __init__(self, context):
        super().__init__(context)
        specific = getattr(context.hf_config, "task_specific_params", None) or {}
        # (src, tgt) -> that pair's settings, for models that declare their pairs (T5).
        self.pairs: dict[tuple[str, str], dict[str, Any]] = {
            langs: dict(settings or {}) for key, settings in specific.items() if (langs := translation_languages(key))
        }
        self.multilingual = callable(getattr(self.tokenizer, "_build_translation_inputs", None))
        # The multilingual tokenizers keep the source language as state while they encode.
        self._tokenizer_lock = threading.Lock()

    def languages(self, params: dict[str, Any]) -> tuple[str | None, str | None]:
        src, tgt = params.get("src_lang") or None, params.get("tgt_lang") or None
        task = params.get("task")
        if (src is None or tgt is None) and isinstance(task, str) and (langs := translation_languages(task)):
            src, tgt = src or langs[0], tgt or langs[1]
        for field, value in (("src_lang", src), ("tgt_lang", tgt)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(field, f"must be a language code string, got {value!r}")
        return src, tgt

    def task_params(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], Hashable]:
        src, tgt = self.languages(params)
        if self.pairs:
            if src is None and tgt is None:
                src, tgt = next(iter(self.pairs))  # transformers picks the model's first pair too
            settings = self.pairs.get((src or "", tgt or ""))
            if settings is None:
                known = ", ".join(f"{s}->{t}" for s, t in self.pairs)
                field = "src_lang" if all(s != src for s, _ in self.pairs) else "tgt_lang"
                raise InvalidArgument(field, f"this model translates {known}; got {src}->{tgt}")
            prefix = settings.get("prefix", self.model_prefix) or ""
            return prefix, {k: v for k, v in settings.items() if k != "prefix"}, ()
        if self.multilingual:
            if src is None or tgt is None:
                raise InvalidArgument("src_lang" if src is None else "tgt_lang",
                                      "is required: this model translates between many languages")
            return self.model_prefix, {}, (src, tgt)
        return self.model_prefix, {}, ()

    def preprocess(self, inputs: Sequence[str], pre: Hashable) -> Any:
        prefix, langs, truncate = pre  # type: ignore[misc]
        if not langs:
            return super().preprocess(inputs, pre)
        src, tgt = langs
        texts = [prefix + text for text in inputs]
        with self._tokenizer_lock:
            try:
                features = self.tokenizer._build_translation_inputs(
                    texts, src_lang=src, tgt_lang=tgt, return_tensors="pt", padding=True, truncation=truncate,
                    max_length=self.max_length if truncate else None)
            except (KeyError, ValueError) as exc:
                raise InvalidArgument("src_lang", f"{src}->{tgt} is not a language pair of this model: {exc}") from None
        features = dict(features)
        features.pop("token_type_ids", None)
        return features
