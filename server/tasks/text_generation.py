"""text-generation: transformers 5's TextGenerationPipeline semantics, prompts and conversations.

Most requests run on the continuous batching engine (server/generation/): the engine's chooser
has transformers' logits processors (sampling.py), so greedy tokens equal `generate`'s. A request
that needs what the engine lacks (num_beams > 1, and the rarer processors: see
generation_params.ENGINE_PARAMETERS) runs as whole sequences instead, one `Instance.generate` per
input on the instance's worker thread (`whole_sequence`, `run_batch`). Both paths shape their
outcomes the same way (`sequence_results`).

The parameters resolve as transformers 5's pipeline resolves them
(`Pipeline._prepare_generate_kwargs`): what the request sets, over what the model's
generation_config.json sets, over the pipeline's defaults (max_new_tokens 256, and sampling at
temperature 0.7 unless the model says otherwise), over generate()'s defaults. Outputs are shaped
like the pipeline's: one list of {"generated_text": ...} per input (the prompt included unless
return_full_text is false; for a conversation, the conversation with the assistant's reply), or
{"generated_token_ids": ...} with return_tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any


from pipeserve.server.errors import InvalidArgument
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.server.generation.outputs import FinishReason, SequenceOutcome, StoppingCriteria
from pipeserve.server.generation.sampling import SamplingParams, TokenChooser
from pipeserve.server.generation.sequence import PlanFactory, SequencePlan
from pipeserve.server.tasks import chat
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.text_generation_options import (
    ENCODE_KEYS,
    MAX_RETURN_SEQUENCES,
    MAX_TOP_LOGPROBS,
    PADDINGS,
    PIPELINE_DEFAULTS,
    PIPELINE_PARAMETERS,
    PIPESERVE_PARAMETERS,
    RETURN_TYPES,
    SAMPLING_ONLY,
    TRUNCATIONS,
    GenerationOptions,
    Prompt,
    json_list,
    long_generation,
    needs_whole_sequence,
    one_of,
    optional_bool,
)
from pipeserve.server.tasks.whole_sequence import WholeSequenceGeneration
from pipeserve.server.tasks.generation_checks import check_seed, check_stop_sequences, check_stop_strings
from pipeserve.server.tasks.generation_params import (
    GENERATE_DEFAULTS,
    as_token_ids,
    check_bool,
    check_combinations,
    check_token_ids,
    eos_token_ids,
    model_generation_config,
    model_set_parameters,
    split_parameters,
    vocab_size,
)

class TextGenerationTask(WholeSequenceGeneration, TokenizingTask):
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
        self.vocab_size = vocab_size(hf)
        self.prefix = getattr(hf, "prefix", None) or ""
        self.limits = self.settings.generation
        self.pipeline_defaults = dict(PIPELINE_DEFAULTS)
        if self.tokenizer.pad_token_id is not None:
            self.pipeline_defaults["pad_token_id"] = self.tokenizer.pad_token_id
        # transformers skips special tokens unless the tokenizer parses replies with a response template.
        self.response_template = getattr(self.tokenizer, "response_template", None)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # -- parameters ----------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        own, request, config = split_parameters(self.with_defaults(params), PIPELINE_PARAMETERS | PIPESERVE_PARAMETERS,
                                                self.name)
        # A generation_config sets parameters under the call's own (Pipeline._get_set_generation_params).
        request = {**(config or {}), **request}
        if "max_length" in own:  # the pipeline gives it to the tokenizer and to generate()
            request["max_length"] = check_int("max_length", own["max_length"], 1)
        if request.get("max_new_tokens") is not None:
            request["max_new_tokens"] = check_int("max_new_tokens", request["max_new_tokens"], 1,
                                                  self.limits.max_new_tokens_limit)
        if request.get("num_return_sequences") is not None:
            request["num_return_sequences"] = check_int("num_return_sequences", request["num_return_sequences"], 1,
                                                        MAX_RETURN_SEQUENCES)
        check_token_ids(request, self.vocab_size)
        prefix = own.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise InvalidArgument("prefix", f"must be a string, got {prefix!r}")
        prefix = self.prefix if prefix is None else prefix
        prefix_length = len(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        stop_strings = check_stop_strings("stop_sequence", own.get("stop_sequence"))
        if "stop_strings" in request:
            stop_strings += tuple(request.pop("stop_strings"))
        if stop_strings:
            request["stop_strings"] = list(stop_strings)
        generate, resolved = self._resolve(request, prefix_length)
        check_combinations(resolved)
        whole = needs_whole_sequence(resolved)
        return_type = self._return_type(own)
        top_logprobs = None
        if own.get("logprobs"):
            check_bool("logprobs", own["logprobs"])
            top_logprobs = check_int("top_logprobs", own.get("top_logprobs") or 0, 0, MAX_TOP_LOGPROBS)
            if whole:
                raise InvalidArgument("logprobs", "comes from the continuous batching engine, and this request runs "
                                      "as whole sequences (num_beams > 1 or a parameter the engine lacks)")
        seed = check_seed(own["seed"]) if own.get("seed") is not None else None
        options = GenerationOptions(
            generate=generate,
            resolved=resolved,
            whole_sequence=whole,
            sampling=self._sampling(resolved, seed),
            eos_token_ids=as_token_ids(resolved.get("eos_token_id")),
            stop_strings=stop_strings,
            stop_sequences=check_stop_sequences(own.get("stop_sequences")),
            return_type=return_type,
            clean_up_tokenization_spaces=optional_bool(own, "clean_up_tokenization_spaces"),
            skip_special_tokens=optional_bool(own, "skip_special_tokens") is not False and not self.response_template,
            prefix=prefix,
            prefix_length=prefix_length,
            handle_long_generation=long_generation(own.get("handle_long_generation")),
            tokenizer_kwargs=self._tokenizer_kwargs(own),
            encode_kwargs=self._encode_kwargs(own.get("tokenizer_encode_kwargs")),
            continue_final_message=optional_bool(own, "continue_final_message"),
            tools=json_list(own, "tools"),
            documents=json_list(own, "documents"),
            num_return_sequences=resolved.get("num_return_sequences") or 1,
            top_logprobs=top_logprobs,
            seed=seed,
        )
        return TaskParams(post=options)

    def _resolve(self, request: dict[str, Any], prefix_length: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(generate()'s kwargs as the pipeline passes them, the same over the model's and
        generate()'s defaults): the request over the model's generation config, the pipeline's
        defaults for what neither sets (its sampling ones only when sampling)."""
        set_params = {**self.model_params, **request}
        added = {k: v for k, v in self.pipeline_defaults.items()
                 if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
        if not {**set_params, **added}.get("do_sample"):
            added = {k: v for k, v in added.items() if k not in SAMPLING_ONLY}
        generate = {**request, **added}
        if prefix_length:  # a total length has to count the prefix too (TextGenerationPipeline._forward)
            for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
                if length in set_params and new_tokens not in set_params:
                    generate[length] = set_params[length] + prefix_length
        resolved = {**GENERATE_DEFAULTS, **self.model_params, **generate}
        for key, value in GENERATE_DEFAULTS.items():
            if resolved.get(key) is None:
                resolved[key] = value
        if resolved.get("max_new_tokens") is not None and "max_new_tokens" not in request:
            # A model default past the server's limit is held to it; the request's own is checked.
            resolved["max_new_tokens"] = min(resolved["max_new_tokens"], self.limits.max_new_tokens_limit)
            if "max_new_tokens" in generate:
                generate["max_new_tokens"] = resolved["max_new_tokens"]
        return generate, resolved

    def _sampling(self, resolved: dict[str, Any], seed: int | None) -> SamplingParams:
        """The engine chooser's parameters (per-prompt lengths are filled in by `plan`)."""
        eos = as_token_ids(resolved.get("eos_token_id"))
        bad = tuple(w for w in resolved.get("bad_words_ids") or () if not (len(w) == 1 and w[0] in eos))
        forced_eos = resolved.get("forced_eos_token_id")
        return SamplingParams(
            do_sample=bool(resolved["do_sample"]),
            temperature=resolved["temperature"],
            top_k=resolved["top_k"] or 0,
            top_p=resolved["top_p"],
            min_p=resolved.get("min_p"),
            typical_p=resolved["typical_p"],
            epsilon_cutoff=resolved["epsilon_cutoff"],
            eta_cutoff=resolved["eta_cutoff"],
            repetition_penalty=resolved["repetition_penalty"],
            no_repeat_ngram_size=resolved["no_repeat_ngram_size"] or 0,
            sequence_bias=tuple((tuple(s), float(b)) for s, b in resolved.get("sequence_bias") or ()),
            bad_words=tuple(tuple(w) for w in bad),
            min_new_tokens=resolved.get("min_new_tokens") or 0,
            eos_token_ids=eos,
            suppress_tokens=tuple(resolved.get("suppress_tokens") or ()),
            begin_suppress_tokens=tuple(resolved.get("begin_suppress_tokens") or ()),
            forced_bos_token_id=resolved.get("forced_bos_token_id"),
            forced_eos_token_id=as_token_ids(forced_eos),
            seed=seed,
        )

    @staticmethod
    def _return_type(own: dict[str, Any]) -> str:
        """TextGenerationPipeline._sanitize_parameters' return_type, with its exclusions."""
        full, tensors, text, kind = (own.get(k) for k in ("return_full_text", "return_tensors", "return_text",
                                                            "return_type"))
        for name in ("return_full_text", "return_tensors", "return_text"):
            if own.get(name) is not None:
                check_bool(name, own[name])
        if kind is not None:
            if kind not in RETURN_TYPES or isinstance(kind, bool):
                raise InvalidArgument("return_type", f"must be tensors, new_text or full_text (0, 1, 2), got {kind!r}")
            return RETURN_TYPES[kind]
        if full is not None:
            if text is not None:
                raise InvalidArgument("return_text", "is mutually exclusive with return_full_text")
            if tensors is not None:
                raise InvalidArgument("return_tensors", "is mutually exclusive with return_full_text")
            return "full_text" if full else "new_text"
        if tensors is not None:
            if text is not None:
                raise InvalidArgument("return_text", "is mutually exclusive with return_tensors")
            return "tensors"  # as transformers: any return_tensors, even false
        return "full_text"

    def _tokenizer_kwargs(self, own: dict[str, Any]) -> dict[str, Any]:
        """The tokenizer's options the pipeline passes on (only those the request sets)."""
        kwargs: dict[str, Any] = {}
        if own.get("add_special_tokens") is not None:
            kwargs["add_special_tokens"] = check_bool("add_special_tokens", own["add_special_tokens"])
        if own.get("truncation") is not None:
            kwargs["truncation"] = one_of("truncation", own["truncation"], TRUNCATIONS)
        if own.get("padding") is not None:
            # One prompt pads to itself; padding to max_length would put pads in a prompt, which runs unpadded.
            kwargs["padding"] = one_of("padding", own["padding"], PADDINGS)
        if own.get("max_length") is not None:
            kwargs["max_length"] = own["max_length"]
        return kwargs

    @staticmethod
    def _encode_kwargs(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        return chat.check_template_kwargs(value)

    # -- inputs ----------------------------------------------------------------------------------

    def check_input(self, index: int, item: Any) -> None:
        field_name = f"inputs[{index}]"
        if isinstance(item, str):
            return
        if not isinstance(item, (list, tuple)):
            raise InvalidArgument(field_name, "must be a prompt string or a conversation (a list of "
                                  "{\"role\", \"content\"} messages)")
        chat.check_conversation(field_name, item)
        if not self.has_chat_template:
            raise InvalidArgument(field_name, f"is a conversation, but model {self.settings.name} has no chat "
                                  "template (tokenizer_config.json chat_template): send a prompt string")

    def size(self, item: Any) -> int:
        return len(item) if isinstance(item, str) else sum(len(str(m.get("content", ""))) for m in item)

    def prompt(self, item: Any, options: GenerationOptions, field_name: str = "input") -> Prompt:
        """Tokenizes an input as the pipeline's preprocess does (the chat template for a
        conversation; the prefix, truncation and "hole" for a prompt)."""
        tokenizer_kwargs = dict(options.tokenizer_kwargs)
        if isinstance(item, str):
            encode = {k: v for k, v in options.encode_kwargs.items() if k in ENCODE_KEYS}
            unknown = sorted(set(options.encode_kwargs) - ENCODE_KEYS)
            if unknown:
                raise InvalidArgument(f"tokenizer_encode_kwargs.{unknown[0]}",
                                      f"is not a tokenizer option for a prompt; allowed: {sorted(ENCODE_KEYS)}")
            ids = list(self.tokenizer(options.prefix + item, **{**tokenizer_kwargs, **encode})["input_ids"])
            messages = None
        else:
            messages = chat.check_conversation(field_name, item)
            tokenizer_kwargs.pop("add_special_tokens", None)  # ignored on chats, as transformers does
            cont = chat.continues(messages, options.continue_final_message)
            try:
                ids = list(self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=not cont, continue_final_message=cont, return_dict=True,
                    tools=options.tools, documents=options.documents, **tokenizer_kwargs, **options.encode_kwargs,
                )["input_ids"])
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise InvalidArgument(field_name, f"the model's chat template refused it: {exc}") from None
            except Exception as exc:  # jinja2's TemplateError (raise_exception in a template) and its kin
                if type(exc).__module__.startswith("jinja2"):
                    raise InvalidArgument(field_name, f"the model's chat template refused it: {exc}") from None
                raise
        if options.handle_long_generation == "hole":
            ids = self._hole(ids, options)
        return Prompt(ids, messages)

    def _hole(self, ids: list[int], options: GenerationOptions) -> list[int]:
        """handle_long_generation="hole": the prompt's start goes so that its end and the new tokens fit."""
        resolved = options.resolved
        new_tokens = resolved.get("max_new_tokens")
        if new_tokens is None:
            new_tokens = resolved["max_length"] - len(ids)
            if new_tokens < 0:
                raise InvalidArgument("handle_long_generation", "cannot tell how many new tokens are expected "
                                      "(max_length is shorter than the prompt)")
        limit = self.tokenizer.model_max_length
        if len(ids) + new_tokens > limit:
            keep = limit - new_tokens
            if keep <= 0:
                raise InvalidArgument("handle_long_generation", f"the new tokens ({new_tokens}) exceed the model's "
                                      f"maximum length ({limit})")
            ids = ids[-keep:]
        return ids

    def _lengths(self, prompt_length: int, options: GenerationOptions) -> tuple[int, int, int]:
        """(new tokens at most, generate's max_length, its min_length) for a prompt, as
        generate's _prepare_generated_length counts them."""
        resolved = options.resolved
        max_new = resolved.get("max_new_tokens")
        if max_new is None:  # a total length, as generate() counts max_length: at least one new token
            max_new = max(1, resolved["max_length"] - prompt_length)
        max_new = min(max_new, self.limits.max_new_tokens_limit)
        min_new = resolved.get("min_new_tokens")
        min_length = min_new + prompt_length if min_new is not None else resolved.get("min_length") or 0
        return max_new, prompt_length + max_new, min_length

    def _check_prompt(self, ids: list[int], field_name: str) -> list[int]:
        if not ids:
            if self.bos_token_id is None:
                raise InvalidArgument(field_name, "is empty and the model has no beginning-of-sequence token to "
                                      "start from")
            ids = [int(self.bos_token_id)]
        if self.max_positions and len(ids) >= self.max_positions:
            raise InvalidArgument(field_name, f"has {len(ids)} tokens; the model's context holds {self.max_positions} "
                                              "(prompt and new tokens together)")
        if self.settings.max_sequence_length and len(ids) > self.settings.max_sequence_length:
            raise InvalidArgument(field_name, f"has {len(ids)} tokens; this model accepts prompts of at most "
                                  f"{self.settings.max_sequence_length} (max_sequence_length)")
        return ids

    # -- one sequence on the engine (runs in the instance's worker thread) -----------------------

    def plan(self, item: Any, options: GenerationOptions, index: int | None = None, sample: int = 0) -> SequencePlan:
        """Tokenizes an input and builds its sequence's chooser, stopping rules and detokenizer.
        `index`: the input's place in a unary request (None: a stream's one input)."""
        field_name = "input" if index is None else f"inputs[{index}]"
        ids = self._check_prompt(self.prompt(item, options, field_name).ids, field_name)
        max_new, max_length, min_length = self._lengths(len(ids), options)
        sampling = replace(options.sampling, min_length=min_length, max_length=max_length)
        if sampling.seed is not None and sample:
            sampling = replace(sampling, seed=(sampling.seed + sample) % 2**64)
        eos = options.eos_token_ids
        return SequencePlan(
            prompt_ids=ids,
            chooser=TokenChooser(sampling, ids),
            stopping=StoppingCriteria(max_new, eos, options.stop_sequences, self.max_positions,
                                      stop_strings=options.stop_strings),
            detokenizer=IncrementalDetokenizer(self._decoder(options)),
            top_logprobs=options.top_logprobs,
        )

    def _decoder(self, options: GenerationOptions):
        return functools.partial(self.tokenizer.decode, skip_special_tokens=options.skip_special_tokens,
                                 clean_up_tokenization_spaces=options.clean_up_tokenization_spaces)

    # -- the generation runtime's side (on the event loop) ---------------------------------------

    def whole_sequence(self, params: TaskParams) -> bool:
        """Whether a request runs as whole sequences (`run_batch`) rather than on the engine."""
        return params.post.whole_sequence

    def sequence_plans(self, inputs: Sequence[Any], params: TaskParams) -> list[list[PlanFactory]]:
        """Per input, one plan factory per returned sequence (num_return_sequences)."""
        options: GenerationOptions = params.post
        return [[functools.partial(self.plan, item, options, index, sample)
                 for sample in range(options.num_return_sequences)] for index, item in enumerate(inputs)]

    def stream_plan(self, item: Any, params: TaskParams) -> PlanFactory:
        options: GenerationOptions = params.post
        if options.num_return_sequences != 1:
            raise InvalidArgument("num_return_sequences", "must be 1 for a stream")
        if options.return_type == "tensors":
            raise InvalidArgument("return_tensors", "does not apply to a stream (its messages carry the token ids)")
        return functools.partial(self.plan, item, options)

    def sequence_results(self, inputs: Sequence[Any], params: TaskParams,
                         outcomes: Sequence[Sequence[SequenceOutcome]]) -> list[list[dict[str, Any]]]:
        options: GenerationOptions = params.post
        return [[self.result(item, o, options) for o in per_input] for item, per_input in zip(inputs, outcomes)]

    def result(self, item: Any, outcome: SequenceOutcome, options: GenerationOptions) -> dict[str, Any]:
        """transformers' record ({"generated_text": ...} or {"generated_token_ids": ...}), with what
        the protocols report besides."""
        extra = {
            "token_ids": outcome.token_ids,
            "finish_reason": outcome.finish_reason.value,
            "prompt_tokens": outcome.prompt_tokens,
            "generated_tokens": outcome.generated_tokens,
            "logprobs": outcome.logprobs,
        }
        if options.return_type == "tensors":
            prompt_ids = self._check_prompt(self.prompt(item, options).ids, "input")
            return {"generated_token_ids": prompt_ids + list(outcome.token_ids), **extra}
        text = self.text(outcome, options)
        if not options.return_full_text:
            return {"generated_text": text, **extra}
        if isinstance(item, str):
            return {"generated_text": item + text, **extra}
        messages = chat.check_conversation("input", item)
        reply = None
        if self.response_template is not None and not chat.continues(messages, options.continue_final_message):
            prefix = self.tokenizer.decode(self.prompt(item, options).ids, skip_special_tokens=False,
                                           clean_up_tokenization_spaces=options.clean_up_tokenization_spaces)
            reply = self.tokenizer.parse_response(text, prefix=prefix, tools=options.tools)
        return {"generated_text": chat.replied(messages, text, options.continue_final_message, reply), **extra}

    def text(self, outcome: SequenceOutcome, options: GenerationOptions) -> str:
        """The new text as the pipeline decodes it: every new token (but a text cut after one of
        pipeserve's stop_sequences ends there)."""
        if outcome.finish_reason is FinishReason.STOP_SEQUENCE and options.stop_sequences:
            return outcome.text
        return self.tokenizer.decode(outcome.token_ids, skip_special_tokens=options.skip_special_tokens,
                                     clean_up_tokenization_spaces=options.clean_up_tokenization_spaces)
