"""text-generation: transformers' TextGenerationPipeline semantics, on the continuous batching engine.

Unary calls and streams both run on the model's GenerationEngine (server/generation/). The
parameters resolve as transformers 5's pipeline resolves them: what the request sets, over what
the model's generation_config.json sets, over the pipeline's defaults (max_new_tokens 256, and
sampling at temperature 0.7 unless the model says otherwise), over generate()'s defaults.
Outputs are shaped like the pipeline's: one list of {"generated_text": ...} per prompt, the prompt
included unless return_full_text is false.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.server.generation.outputs import SequenceOutcome, StoppingCriteria
from pipeserve.server.generation.sampling import SamplingParams, TokenChooser
from pipeserve.server.generation.sequence import PlanFactory, SequencePlan
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.generation_params import (
    GENERATE_DEFAULTS,
    check_bool,
    check_sampling,
    check_stop_sequences,
    eos_token_ids,
    model_generation_config,
    model_set_parameters,
)

# transformers 5's TextGenerationPipeline defaults, for what the model's generation config leaves unset.
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
_SAMPLING_ONLY = ("temperature", "top_k", "top_p")
MAX_RETURN_SEQUENCES = 64
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationOptions:
    """A request's parameters, checked and resolved against the model's defaults."""

    sampling: SamplingParams
    # New tokens at most; None: max_length minus the prompt.
    max_new_tokens: int | None
    max_length: int
    stop_sequences: tuple[str, ...] = ()
    return_full_text: bool = True
    num_return_sequences: int = 1
    top_logprobs: int | None = None


class TextGenerationTask(TokenizingTask):
    name = "text-generation"
    kind = "generation"
    model_class = "AutoModelForCausalLM"
    input_names = ("input_ids",)
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        hf = context.hf_config
        self.generation_config = model_generation_config(context)
        self.model_params = model_set_parameters(self.generation_config)
        self.eos_token_ids = eos_token_ids(self.generation_config, hf)
        bos = self.generation_config.bos_token_id
        self.bos_token_id = bos if bos is not None else getattr(hf, "bos_token_id", None)
        # Absolute-position models cannot go past their positions; 0: no known bound.
        self.max_positions = int(getattr(hf, "max_position_embeddings", 0) or getattr(hf, "n_positions", 0) or 0)
        self.prefix = getattr(hf, "prefix", None) or ""
        self.limits = self.settings.generation
        self._decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)

    # -- parameters ----------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        request = check_sampling(params)
        if params.get("max_new_tokens") is not None:
            request["max_new_tokens"] = check_int("max_new_tokens", params["max_new_tokens"], 1,
                                                  self.limits.max_new_tokens_limit)
        if params.get("max_length") is not None:
            request["max_length"] = check_int("max_length", params["max_length"], 1)
        resolved = self._resolve(request)
        return_full_text = params.get("return_full_text", True)
        return_full_text = True if return_full_text is None else check_bool("return_full_text", return_full_text)
        n = check_int("num_return_sequences", params.get("num_return_sequences") or 1, 1, MAX_RETURN_SEQUENCES)
        if n > 1 and not resolved["do_sample"]:
            raise InvalidArgument("num_return_sequences",
                                  "must be 1 with greedy decoding (set do_sample to sample several)")
        top_logprobs = None
        if params.get("logprobs"):
            top_logprobs = check_int("top_logprobs", params.get("top_logprobs") or 0, 0, MAX_TOP_LOGPROBS)
        max_new = resolved.get("max_new_tokens")
        if max_new is not None:
            max_new = min(max_new, self.limits.max_new_tokens_limit)  # a model default past the limit
        sampling = SamplingParams(
            do_sample=resolved["do_sample"],
            temperature=resolved["temperature"],
            top_k=resolved["top_k"] or 0,
            top_p=resolved["top_p"],
            repetition_penalty=resolved["repetition_penalty"],
            seed=resolved.get("seed"),
        )
        stops = check_stop_sequences(params.get("stop_sequences", params.get("stop_sequence")))
        return TaskParams(post=GenerationOptions(
            sampling=sampling, max_new_tokens=max_new, max_length=resolved["max_length"], stop_sequences=stops,
            return_full_text=return_full_text, num_return_sequences=n, top_logprobs=top_logprobs,
        ))

    def _resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request's parameters over the model's, the pipeline's defaults and generate()'s."""
        set_params = {**self.model_params, **request}
        added = {k: v for k, v in PIPELINE_DEFAULTS.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in _SAMPLING_ONLY}
        resolved = {**GENERATE_DEFAULTS, **set_params, **added}
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if resolved.get(key) is None:
                resolved[key] = GENERATE_DEFAULTS[key]
        return resolved

    # -- one sequence (runs in the instance's worker thread) -------------------------------------

    def plan(self, prompt: str, options: GenerationOptions, index: int | None = None, sample: int = 0) -> SequencePlan:
        """Tokenizes a prompt and builds its sequence's chooser, stopping rules and detokenizer.
        `index`: the prompt's place in a unary request (None: a stream's one input)."""
        ids = list(self.tokenizer(self.prefix + prompt)["input_ids"])
        field = "input" if index is None else f"inputs[{index}]"
        if not ids:
            if self.bos_token_id is None:
                raise InvalidArgument(field, "is empty and the model has no beginning-of-sequence token to start from")
            ids = [int(self.bos_token_id)]
        if self.max_positions and len(ids) >= self.max_positions:
            raise InvalidArgument(field, f"has {len(ids)} tokens; the model's context holds {self.max_positions} "
                                         "(prompt and new tokens together)")
        if self.settings.max_sequence_length and len(ids) > self.settings.max_sequence_length:
            raise InvalidArgument(field, f"has {len(ids)} tokens; this model accepts prompts of at most "
                                         f"{self.settings.max_sequence_length} (max_sequence_length)")
        max_new = options.max_new_tokens
        if max_new is None:  # a total length, as generate() counts max_length: at least one new token
            max_new = min(max(1, options.max_length - len(ids)), self.limits.max_new_tokens_limit)
        sampling = options.sampling
        if sampling.seed is not None and sample:
            sampling = replace(sampling, seed=(sampling.seed + sample) % 2**64)
        return SequencePlan(
            prompt_ids=ids,
            chooser=TokenChooser(sampling, ids),
            stopping=StoppingCriteria(max_new, self.eos_token_ids, options.stop_sequences, self.max_positions),
            detokenizer=IncrementalDetokenizer(self._decode),
            top_logprobs=options.top_logprobs,
        )

    # -- the generation runtime's side (on the event loop) ---------------------------------------

    def sequence_plans(self, inputs: Sequence[str], params: TaskParams) -> list[list[PlanFactory]]:
        """Per prompt, one plan factory per returned sequence (num_return_sequences)."""
        options: GenerationOptions = params.post
        return [[functools.partial(self.plan, prompt, options, index, sample)
                 for sample in range(options.num_return_sequences)] for index, prompt in enumerate(inputs)]

    def stream_plan(self, prompt: str, params: TaskParams) -> PlanFactory:
        options: GenerationOptions = params.post
        if options.num_return_sequences != 1:
            raise InvalidArgument("num_return_sequences", "must be 1 for a stream")
        return functools.partial(self.plan, prompt, options)

    def sequence_results(self, inputs: Sequence[str], params: TaskParams,
                         outcomes: Sequence[Sequence[SequenceOutcome]]) -> list[list[dict[str, Any]]]:
        options: GenerationOptions = params.post
        return [[self.result(prompt, o, options) for o in per_input] for prompt, per_input in zip(inputs, outcomes)]

    @staticmethod
    def result(prompt: str, outcome: SequenceOutcome, options: GenerationOptions) -> dict[str, Any]:
        """transformers' {"generated_text": ...}, with what the protocol reports besides."""
        text = prompt + outcome.text if options.return_full_text else outcome.text
        return {
            "generated_text": text,
            "token_ids": outcome.token_ids,
            "finish_reason": outcome.finish_reason.value,
            "prompt_tokens": outcome.prompt_tokens,
            "generated_tokens": outcome.generated_tokens,
            "logprobs": outcome.logprobs,
        }
