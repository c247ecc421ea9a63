"""How a loaded model runs requests: a batched runtime (the dynamic batcher) or a generation
runtime (the continuous batching engine), picked by the task's declared kind."""
