"""Whole-sequence text generation: one `Instance.generate` per input, as the pipeline runs it.

For what the continuous batching engine cannot do (num_beams > 1, the rarer logits processors):
the generation runtime sends such a request through the model's dynamic batcher, whose batches
come to `run_batch` in the instance's worker thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeserve.backends.base import Instance
from pipeserve.server.errors import InvalidArgument, PipeserveError, Unimplemented
from pipeserve.server.generation.outputs import FinishReason, SequenceOutcome
from pipeserve.server.tasks.base import TaskParams
from pipeserve.server.tasks.generation_params import DEFAULT_GENERATOR, generate_objects
from pipeserve.server.tasks.text_generation_options import GenerationOptions


class WholeSequenceGeneration:
    """A mixin of TextGenerationTask (its tokenizer, prompts and lengths)."""

    def run_batch(self, instance: Instance, inputs: Sequence[Any], params: Sequence[TaskParams]) -> list[Any]:
        """Whole-sequence generation: per input, its sequences' outcomes (or the error that fails it)."""
        results: list[Any] = []
        for item, p in zip(inputs, params):
            try:
                results.append(self.generate_whole(instance, item, p.post))
            except PipeserveError as exc:
                results.append(exc)
        return results

    def generate_whole(self, instance: Instance, item: Any, options: GenerationOptions) -> list[SequenceOutcome]:
        """One input through `Instance.generate`, as the pipeline runs it (alone, batch size 1)."""
        if not instance.supports_generate:
            raise Unimplemented(f"model {self.settings.name}'s backend has no whole-sequence generate(), which "
                                "num_beams > 1 and the parameters the engine lacks need")
        ids = self._check_prompt(self.prompt(item, options).ids, "input")
        kwargs = self._generate_kwargs(options, len(ids))
        features = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        # Tensors go with the inputs, which the backend puts on the instance's device.
        features.update({k: kwargs.pop(k) for k in list(kwargs) if isinstance(kwargs[k], torch.Tensor)})
        try:
            if not options.resolved.get("do_sample"):
                output = instance.generate(features, **kwargs)
            else:
                with DEFAULT_GENERATOR:
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    output = instance.generate(features, **kwargs)
        except ValueError as exc:  # generate() refusing the parameters (its own validation)
            raise InvalidArgument("parameters", f"generate() refused them: {exc}") from None
        eos = set(options.eos_token_ids)
        outcomes = []
        for row in output.tolist():
            new = row[len(ids):]
            text = self.tokenizer.decode(new, skip_special_tokens=options.skip_special_tokens,
                                         clean_up_tokenization_spaces=options.clean_up_tokenization_spaces)
            ended = next((i for i, t in enumerate(new) if t in eos), None)
            if ended is not None:
                new = new[: ended + 1]  # what follows an end-of-sequence token is padding
                reason = FinishReason.EOS
            elif any(s in text for s in (*options.stop_strings, *options.stop_sequences)):
                reason = FinishReason.STOP_SEQUENCE
            else:
                reason = FinishReason.LENGTH
            if reason is FinishReason.STOP_SEQUENCE and options.stop_sequences:
                cut = min((text.find(s) + len(s) for s in options.stop_sequences if s in text), default=len(text))
                text = text[:cut]
            outcomes.append(SequenceOutcome(new, text, [], reason, len(ids), len(new), 0.0))
        return outcomes

    def _generate_kwargs(self, options: GenerationOptions, prompt_length: int) -> dict[str, Any]:
        kwargs = dict(options.generate)
        # New tokens as generate() counts them from max_length or max_new_tokens, held to the server's
        # limit as the engine holds them (a model default past it).
        max_new = self._lengths(prompt_length, options)[0]
        kwargs.pop("max_new_tokens", None)
        kwargs.pop("max_length", None)
        if "max_new_tokens" in self.model_params:  # 5.x would count it over an explicit max_length
            kwargs["max_new_tokens"] = max_new
        else:
            kwargs["max_length"] = prompt_length + max_new
        if options.stop_strings or options.stop_sequences:
            kwargs["stop_strings"] = [*options.stop_strings, *options.stop_sequences]
        return generate_objects(kwargs, self.tokenizer)
