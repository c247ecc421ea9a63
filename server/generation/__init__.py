"""Generation: the continuous batching engine, split as vLLM splits its engine.

engine.py       GenerationEngine (one InstanceDecoder loop per model instance): composes the parts
scheduler.py    Scheduler: admission, budgets, Overloaded, deadlines, the refill wait (no torch)
runner.py       StepRunner: the forward of one step on one instance (joint, or prefill/decode)
outputs.py      the output processor: token choice hand-off, stopping, text deltas, logprobs,
                FinishReason, TokenEvent, SequenceOutcome, StoppingCriteria
delivery.py     SequenceOutput: one sequence's bounded queue of events for its reader
sequence.py     SequencePlan (what the task builds), SequenceState (the engine's view)
sampling.py     SamplingParams, TokenChooser: greedy or sampled next token through transformers'
                logits processors (in generate's order), per-sequence seed
detokenizer.py  IncrementalDetokenizer: text deltas right for multi-byte characters and merges
"""
