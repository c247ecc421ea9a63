"""What the generation tests share: the in-process reference model, raw stubs, statistics."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import torch
from pipeserve.v1 import model_service_pb2 as ms
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_generation_pb2 as pb
from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

# Prompts of different lengths (in tokens: about 2 to 40), some not ASCII.
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Batching merges many small requests into one large forward pass, which is faster per item, "
    "and a good server keeps its promises.",
    "café naïve 日本語",
    "It was a bright cold day in April",
]


class Reference:
    """The served model's files loaded in-process with transformers."""

    def __init__(self, folder: Path):
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def generate(self, prompt: str, seed: int | None = None, **kwargs) -> list[int]:
        """model.generate's new tokens for one prompt (seeded like `torch.manual_seed(seed)`)."""
        ids = torch.tensor([self.ids(prompt)])
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class Seq2SeqReference:
    """An encoder-decoder model's files loaded in-process with transformers."""

    def __init__(self, folder: Path):
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def __call__(self, text: str, seed: int | None = None, **kwargs) -> list[str]:
        """What generate() writes for one input alone, decoded as the pipeline decodes."""
        inputs = self.tokenizer(text, return_tensors="pt")
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)


def stub(channel: grpc.Channel) -> pb_grpc.TextGenerationServiceStub:
    return pb_grpc.TextGenerationServiceStub(channel)


def params(**fields) -> pb.GenerationParameters:
    return pb.GenerationParameters(**fields)


def statistics(target: str, model: str) -> ms.ModelStatistics:
    with grpc.insecure_channel(target) as channel:
        found = ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest(name=model)).models
    return max(found, key=lambda m: m.version)


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Polls a condition the server exposes (no event reaches the client for it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)
