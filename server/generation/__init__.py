"""Generation: the continuous batching engine and the small objects it steps sequences with.

engine.py       GenerationEngine (one InstanceDecoder per model instance), SequencePlan
sampling.py     SamplingParams, TokenChooser: greedy or sampled next token, per-sequence seed
stopping.py     StoppingCriteria, FinishReason: eos, length, stop sequences
detokenizer.py  IncrementalDetokenizer: text deltas right for multi-byte characters and merges
stream.py       SequenceStream, TokenEvent: what a sequence's reader receives
"""
