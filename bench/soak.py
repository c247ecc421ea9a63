"""Soak (`make soak`, not in CI): the server's resident memory across 100,000 requests after a warm-up.

A mix of the default repository's small models over several services, with a share of bad
requests (so that error paths are soaked too), from closed-loop asyncio clients. The server's RSS
is sampled while the load runs (RSS under load and at rest differ by tens of MiB: batches in
flight, buffers the allocator keeps), every 1/40 of the run. The figure is the growth from the
end of the warm-up (the median of its last samples) to the end of the run (the median of the
last samples), which must stay under 5%; the trend (least squares) is printed with it.

    python -m bench.soak [--requests 100000] [--warmup 10000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import sys
import time
from collections.abc import Awaitable, Callable

import grpc
import psutil

from bench.harness import ROOT, BenchServer
from pipeserve.v1 import fill_mask_pb2, fill_mask_pb2_grpc
from pipeserve.v1 import model_service_pb2 as ms_pb
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import question_answering_pb2, question_answering_pb2_grpc
from pipeserve.v1 import text_classification_pb2, text_classification_pb2_grpc
from pipeserve.v1 import token_classification_pb2, token_classification_pb2_grpc

MODELS = ["sentiment", "ner", "fill-mask", "qa"]
GROWTH_LIMIT = 0.05
SAMPLES = 40
# Samples whose median stands for "the end of" the warm-up and of the run.
WINDOW = 5

Call = Callable[[int], Awaitable[object]]


def calls(channel: grpc.aio.Channel) -> list[Call]:
    """One request per kind, varied by the request number; every tenth kind is a bad request."""
    classify = text_classification_pb2_grpc.TextClassificationServiceStub(channel).Classify
    tokens = token_classification_pb2_grpc.TokenClassificationServiceStub(channel).ClassifyTokens
    fill = fill_mask_pb2_grpc.FillMaskServiceStub(channel).FillMask
    answer = question_answering_pb2_grpc.QuestionAnsweringServiceStub(channel).Answer
    tc, tok, fm, qa = text_classification_pb2, token_classification_pb2, fill_mask_pb2, question_answering_pb2
    return [
        lambda i: classify(tc.ClassifyRequest(inputs=[f"review number {i} says it was fine"] * (1 + i % 4)), timeout=60),
        lambda i: classify(tc.ClassifyRequest(inputs=[f"a pair {i}"], text_pairs=["and its second half"], top_k=0), timeout=60),
        lambda i: tokens(tok.ClassifyTokensRequest(inputs=[f"Alice {i} moved to Paris"],
                                                   aggregation_strategy=tok.AGGREGATION_STRATEGY_SIMPLE), timeout=60),
        lambda i: fill(fm.FillMaskRequest(inputs=[f"The {i} [MASK] sat on the mat."], top_k=3), timeout=60),
        lambda i: answer(qa.AnswerRequest(inputs=[qa.QuestionContext(question="Where does the cat sit?",
                                                                    context=f"The cat {i} sits on the mat.")]), timeout=60),
        lambda i: classify(tc.ClassifyRequest(inputs=[f"text {i} " * 200]), timeout=60),  # truncated long input
        lambda i: classify(tc.ClassifyRequest(inputs=[]), timeout=60),  # INVALID_ARGUMENT
        lambda i: classify(tc.ClassifyRequest(model=f"no-such-model-{i % 7}", inputs=["x"]), timeout=60),  # NOT_FOUND
        lambda i: fill(fm.FillMaskRequest(inputs=["no mask here"]), timeout=60),  # INVALID_ARGUMENT
        lambda i: classify(tc.ClassifyRequest(inputs=["deadline"]), timeout=1e-4),  # DEADLINE_EXCEEDED, maybe
    ]


class Soak:
    def __init__(self, server: BenchServer, concurrency: int):
        assert server.proc is not None
        self.server = server
        self.process = psutil.Process(server.proc.pid)
        self.concurrency = concurrency
        self.statuses: collections.Counter = collections.Counter()
        self.samples: list[tuple[int, int]] = []

    def rss(self) -> int:
        return self.process.memory_info().rss

    async def run(self, first: int, count: int, sample_every: int = 0) -> list[tuple[int, int]]:
        """Sends requests first .. first+count-1 from `concurrency` closed-loop clients; returns
        (requests done, RSS) samples taken every `sample_every` requests."""
        self.samples = []
        numbers = iter(range(first, first + count))
        done = itertools.count(1)
        channels = [grpc.aio.insecure_channel(self.server.target) for _ in range(4)]
        kinds = [calls(channel) for channel in channels]

        async def client(k: int) -> None:
            for i in numbers:
                call = kinds[k % len(kinds)][i % len(kinds[0])]
                try:
                    await call(i)
                    self.statuses["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    self.statuses[error.code().name] += 1
                n = next(done)
                if sample_every and n % sample_every == 0:
                    self.samples.append((n, self.rss()))

        try:
            await asyncio.gather(*(client(k) for k in range(self.concurrency)))
        finally:
            for channel in channels:
                await channel.close()
        return self.samples

    async def slots_held(self) -> list[tuple[str, int, int]]:
        async with grpc.aio.insecure_channel(self.server.target) as channel:
            reply = await ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(), timeout=10)
        return [(m.name, m.in_flight, m.queued) for m in reply.models if m.in_flight or m.queued]


def median(values: list[int]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def slope(samples: list[tuple[int, int]]) -> float:
    """Least-squares bytes per request."""
    n = len(samples)
    mx = sum(x for x, _ in samples) / n
    my = sum(y for _, y in samples) / n
    var = sum((x - mx) ** 2 for x, _ in samples)
    return sum((x - mx) * (y - my) for x, y in samples) / var if var else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    mib = 2**20

    with BenchServer(ROOT / "model_repository", MODELS, log_name="soak-server") as server:
        soak = Soak(server, args.concurrency)
        started = time.monotonic()
        warm = asyncio.run(soak.run(0, args.warmup, sample_every=max(1, args.warmup // (2 * WINDOW))))
        rest_before = soak.rss()
        print(f"warm-up: {args.warmup} requests in {time.monotonic() - started:.0f} s", flush=True)
        started = time.monotonic()
        samples = asyncio.run(soak.run(args.warmup, args.requests, sample_every=max(1, args.requests // SAMPLES)))
        seconds = time.monotonic() - started
        rest_after = soak.rss()
        held = asyncio.run(soak.slots_held())

    baseline = median([rss for _, rss in warm[-WINDOW:]])
    final = median([rss for _, rss in samples[-WINDOW:]])
    print(f"{'requests':>9}  {'RSS MiB':>8}  {'vs warm-up':>10}")
    for n, rss in samples:
        print(f"{n:>9}  {rss / mib:>8.1f}  {(rss - baseline) / baseline:>+10.2%}")
    growth = (final - baseline) / baseline
    trend = slope(samples) * args.requests
    print(f"statuses: {dict(soak.statuses.most_common())}")
    print(f"{args.requests} requests in {seconds:.0f} s ({args.requests / seconds:.0f}/s), concurrency {args.concurrency}")
    print(f"at rest: {rest_before / mib:.1f} MiB after the warm-up, {rest_after / mib:.1f} MiB after the run")
    print(f"trend over the run: {trend / mib:+.1f} MiB per {args.requests} requests")
    print(f"RSS growth over {args.requests} requests after warm-up: {growth:+.2%} "
          f"({baseline / mib:.1f} -> {final / mib:.1f} MiB, medians of {WINDOW} samples under load); "
          f"limit {GROWTH_LIMIT:.0%}: {'PASS' if growth < GROWTH_LIMIT else 'FAIL'}")
    if held:
        print(f"slots still held at the end: {held}: FAIL")
    return 0 if growth < GROWTH_LIMIT and not held else 1


if __name__ == "__main__":
    sys.exit(main())
