"""Streaming generation: pipeserve's continuous batching against model.generate one request at a time.

Same run, same model (gpt2-small: GPT-2-small sized, 768 wide, 12 layers, random weights), same
requests (greedy; prompts of 8 to 64 tokens; 32 to 96 new tokens each):
  generate 1-by-1   transformers' model.generate in this process, one request after another, in
                    slices before, between and after the server's loads (the server idles then)
  server cN         N clients streaming over gRPC (GenerateStream) from a server subprocess, each
                    sending its next request as soon as the previous one ends; the clients start
                    one after another over RAMP seconds, so requests arrive at different times
For each load: aggregate generated tokens/s (tokens received in the measured window), the ratio to
generate 1-by-1 (over the whole run, and to the slices just before and after the load: the
machine is shared, so what it gives drifts), time to first token (client side) p50/p99, and the
rows the server's engine steps ran (each a joint step: the running rows and the prompts that joined
them). Targets (issue 5): >= 5x the 1-by-1 tokens/s at 16 streams, and TTFT p50 at 16 streams < 3x
the unloaded one (1 stream).

Prints the table and writes bench/out/generation.{json,png}.
    python -m bench generation      (or `make bench` for every benchmark)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import OUT, BenchServer, load_average, percentile, pyplot, table

MODELS_DIR = OUT / "models"
REPOSITORY = OUT / "repository"
MODEL = "gpt2-small"
# How the server serves it: one instance whose torch ops run on one thread and whose linear layers
# may use numpy's BLAS on two (backends/cpu_matmul.py times both libraries at load and routes each
# product to the faster). Two OpenMP threads for every op lost more than they gained: a decode step
# is some two thousand small ops, and each makes both threads meet (3.2x the baseline at 16 streams
# against 3.9-4.2x on one thread, before joint steps); a decode step's matrix products are the few
# big pieces worth splitting (62 ms a 16-row step on two BLAS threads against 82 ms on one).
SERVING = ('generation { max_concurrent_sequences: 32 }\n'
           'backend_parameters { key: "intra_op_threads" value: "1" }\n'
           'backend_parameters { key: "matmul_threads" value: "2" }\n')
SEED = 0
CONCURRENCY = (1, 4, 16, 32)
REQUESTS = 256
BASELINE_REQUESTS = 3  # per slice of the one-at-a-time baseline (one slice before each load, one after the last)
PROMPT_TOKENS = (8, 64)
NEW_TOKENS = (32, 96)
RAMP = 2.0     # seconds over which the clients start, one after another
WARMUP = 4.0   # seconds after the last client started before the window opens
WINDOW = 15.0  # seconds measured


@dataclass
class Load:
    """One line of the table."""

    mode: str
    concurrency: int
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    # Decode steps the server ran in the window, by rows.
    steps: dict[int, int] = field(default_factory=dict)
    # generate 1-by-1 tokens/s measured just before and after this load (the machine is shared).
    local_baseline: float = 0.0
    # Time the server's engine steps (joint, or decode where a backend has no joint steps) took in
    # the window; the rest: separate prefill steps, waits for arrivals, idling.
    decode_seconds: float = 0.0

    @property
    def decode_step_ms(self) -> float:
        steps = sum(self.steps.values())
        return self.decode_seconds / steps * 1e3 if steps else 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def ttft_p50_ms(self) -> float:
        return percentile(self.ttft, 50) * 1e3

    @property
    def ttft_p99_ms(self) -> float:
        return percentile(self.ttft, 99) * 1e3

    @property
    def mean_rows(self) -> float:
        steps = sum(self.steps.values())
        return sum(rows * n for rows, n in self.steps.items()) / steps if steps else 0.0

    def as_dict(self) -> dict:
        return {"mode": self.mode, "concurrency": self.concurrency, "tokens": self.tokens, "seconds": self.seconds,
                "tokens_per_second": self.rate, "ttft_p50_ms": self.ttft_p50_ms, "ttft_p99_ms": self.ttft_p99_ms,
                "mean_decode_rows": self.mean_rows, "decode_step_ms": self.decode_step_ms,
                "decode_share_of_window": self.decode_seconds / self.seconds if self.seconds else 0.0,
                "generate_1_by_1_around": self.local_baseline}


def build_model() -> Path:
    """The model, built once into the bench cache, and a repository entry that serves it."""
    from pipeserve.model_builder import build_default_repository

    built = build_default_repository(MODELS_DIR, only={MODEL})
    if built:
        print(f"built {', '.join(built)} into {MODELS_DIR}")
    folder = REPOSITORY / MODEL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(
        f'name: "{MODEL}"\ntask: "text-generation"\nsource {{ path: "{(MODELS_DIR / MODEL).resolve()}" }}\n{SERVING}')
    return REPOSITORY


def make_requests(tokenizer) -> list[tuple[str, int]]:
    """(prompt, max_new_tokens) pairs: prompts of PROMPT_TOKENS tokens made of vocabulary words."""
    rng = random.Random(SEED)
    words = sorted(w.lstrip("Ġ") for w in tokenizer.get_vocab() if w.startswith("Ġ") and w[1:].isalpha())
    requests = []
    for _ in range(REQUESTS):
        want = rng.randint(*PROMPT_TOKENS)
        text = rng.choice(words)
        while len(tokenizer(text)["input_ids"]) < want:
            text += " " + rng.choice(words)
        requests.append((text, rng.randint(*NEW_TOKENS)))
    return requests


# -- transformers in-process ------------------------------------------------------------------------


class OneByOne:
    """transformers' model.generate in this process, one request after another."""

    def __init__(self, folder: Path, requests: list[tuple[str, int]]):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.requests = requests
        self.next = 0
        self._generate(*requests[0])  # warm

    def _generate(self, prompt: str, new: int) -> tuple[int, float]:
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=new, do_sample=False)
        return out.shape[1] - ids["input_ids"].shape[1], time.perf_counter() - started

    def measure(self, count: int = BASELINE_REQUESTS) -> Load:
        """The next `count` requests of the workload, one at a time."""
        tokens, seconds, ttft = 0, 0.0, []
        for _ in range(count):
            prompt, new = self.requests[self.next % len(self.requests)]
            self.next += 1
            n, s = self._generate(prompt, new)
            tokens, seconds = tokens + n, seconds + s
            ttft.append(self._generate(prompt, 1)[1])  # the prefill and first token alone
        return Load("generate 1-by-1", 1, tokens, seconds, ttft)


def combined(slices: list[Load]) -> Load:
    return Load("generate 1-by-1", 1, sum(s.tokens for s in slices), sum(s.seconds for s in slices),
                [t for s in slices for t in s.ttft])


# -- pipeserve over gRPC ----------------------------------------------------------------------------


async def measure_streams(target: str, concurrency: int, requests: list[tuple[str, int]]) -> Load:
    import grpc
    from pipeserve.v1 import model_service_pb2 as ms
    from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
    from pipeserve.v1 import text_generation_pb2 as pb
    from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc

    messages = [pb.GenerateStreamRequest(model=MODEL, input=prompt, parameters=pb.GenerationParameters(
        max_new_tokens=new, do_sample=False)) for prompt, new in requests]
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    start = time.perf_counter()
    opens = start + RAMP + WARMUP
    closes = opens + WINDOW
    tokens = 0
    ttft: list[float] = []

    async def client(index: int, channel) -> None:
        nonlocal tokens
        stub = pb_grpc.TextGenerationServiceStub(channel)
        await asyncio.sleep(index * RAMP / concurrency)
        n = index
        while time.perf_counter() < closes:
            sent, first = time.perf_counter(), None
            async for message in stub.GenerateStream(messages[n % len(messages)]):
                now = time.perf_counter()
                if first is None and message.token_ids:
                    first = now
                    if opens <= sent < closes:
                        ttft.append(first - sent)
                if opens <= now < closes:
                    tokens += len(message.token_ids)
            n += concurrency

    async def decode_steps() -> tuple[dict[int, int], int]:
        """(decode steps by rows, nanoseconds the decode steps took) so far."""
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest(name=MODEL))
        return dict(reply.models[0].batch_sizes), reply.models[0].compute.total_ns

    try:
        for channel in channels:
            await channel.channel_ready()
        tasks = [asyncio.create_task(client(i, ch)) for i, ch in enumerate(channels)]
        await asyncio.sleep(opens - time.perf_counter())
        before, before_ns = await decode_steps()
        await asyncio.sleep(closes - time.perf_counter())
        after, after_ns = await decode_steps()
        for task in tasks:
            task.cancel()  # the streams still running are cancelled: the server drops them
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close()
    steps = {rows: after[rows] - before.get(rows, 0) for rows in after if after[rows] > before.get(rows, 0)}
    load = Load("server", concurrency, tokens, WINDOW, ttft, dict(sorted(steps.items())))
    load.decode_seconds = (after_ns - before_ns) / 1e9
    return load


# -- the report -------------------------------------------------------------------------------------


def targets(baseline: Load, loads: list[Load]) -> list[tuple[str, str, bool]]:
    by_c = {load.concurrency: load for load in loads}
    found = []
    if 16 in by_c:
        ratio = by_c[16].rate / baseline.rate
        local = by_c[16].rate / by_c[16].local_baseline
        found.append((">= 5x the generate 1-by-1 tokens/s at 16 streams",
                      f"{ratio:.2f}x ({by_c[16].rate:.0f} vs {baseline.rate:.0f} tokens/s; {local:.2f}x the slices "
                      "measured around it)", min(ratio, local) >= 5))
    if 16 in by_c and 1 in by_c:
        ratio = by_c[16].ttft_p50_ms / by_c[1].ttft_p50_ms
        found.append(("TTFT p50 at 16 streams < 3x unloaded (1 stream)",
                      f"{ratio:.2f}x ({by_c[16].ttft_p50_ms:.0f} vs {by_c[1].ttft_p50_ms:.0f} ms)", ratio < 3))
    return found


def report(baseline: Load, loads: list[Load]) -> str:
    rows = []
    for load in [baseline, *loads]:
        around = f"{load.rate / load.local_baseline:.2f}x" if load.local_baseline else "-"
        rows.append((load.mode, str(load.concurrency), f"{load.rate:.1f}", f"{load.rate / baseline.rate:.2f}x", around,
                     f"{load.ttft_p50_ms:.0f}", f"{load.ttft_p99_ms:.0f}",
                     f"{load.mean_rows:.1f}" if load.steps else "-",
                     f"{load.decode_step_ms:.0f}" if load.steps else "-",
                     f"{load.decode_seconds / load.seconds:.0%}" if load.steps else "-"))
    lines = [table(rows, ("mode", "streams", "tokens/s", "vs 1-by-1", "vs slices around", "TTFT p50 ms",
                          "TTFT p99 ms", "rows/step", "step ms", "stepping"))]
    lines.append("(rows/step: sequences a step advanced, prompts that joined it included; stepping: the share of the "
                 "window spent in those steps, the rest went to between-step work, waits for arrivals and idling)")
    lines.append("(generate 1-by-1 TTFT: generate(max_new_tokens=1) in-process, no gRPC)")
    lines.append("\ntargets")
    for name, measured, met in targets(baseline, loads):
        lines.append(f"  [{'met' if met else 'MISSED'}] {name}: {measured}")
    return "\n".join(lines)


def plot(baseline: Load, loads: list[Load], path: Path) -> bool:
    """Draws the figure; False where matplotlib is missing (the tables say it all the same)."""
    plt = pyplot()
    if plt is None:
        return False

    xs = [load.concurrency for load in loads]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 8))
    top.plot(xs, [load.rate for load in loads], "o-", label="pipeserve, continuous batching (gRPC streams)")
    top.axhline(baseline.rate, linestyle=":", color="gray", label="model.generate, one request at a time")
    top.axhline(5 * baseline.rate, linestyle="--", color="lightgray", label="5x one at a time (target at 16)")
    top.set(title=f"{MODEL}: aggregate generated tokens/s", xscale="log", xlabel="concurrent streams",
            ylabel="tokens/s")
    top.set_xticks(xs, [str(x) for x in xs])
    top.set_ylim(bottom=0)
    top.legend(fontsize=8)
    bottom.plot(xs, [load.ttft_p50_ms for load in loads], "o-", label="TTFT p50")
    bottom.plot(xs, [load.ttft_p99_ms for load in loads], "s--", label="TTFT p99")
    bottom.axhline(3 * loads[0].ttft_p50_ms, linestyle="--", color="lightgray", label="3x unloaded p50 (target)")
    bottom.set(title=f"{MODEL}: time to first token", xscale="log", xlabel="concurrent streams", ylabel="ms")
    bottom.set_xticks(xs, [str(x) for x in xs])
    bottom.set_ylim(bottom=0)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(concurrency: tuple[int, ...] = CONCURRENCY) -> tuple[Load, list[Load]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"generation benchmark ({os.cpu_count()} cores, load average {load_average()})", flush=True)
    repository = build_model()
    from transformers import AutoTokenizer

    requests = make_requests(AutoTokenizer.from_pretrained(MODELS_DIR / MODEL))
    # The one-at-a-time baseline runs in slices between the server's loads (the server idles
    # meanwhile), so that each load is compared with what the machine gave just before and after.
    one_by_one = OneByOne(MODELS_DIR / MODEL, requests)
    slices = [one_by_one.measure()]
    print(f"  generate 1-by-1: {slices[-1].rate:.1f} tokens/s", flush=True)
    loads = []
    with BenchServer(repository, [MODEL], log_name=f"server-{MODEL}") as server:
        for c in concurrency:
            loads.append(asyncio.run(measure_streams(server.target, c, requests)))
            slices.append(one_by_one.measure())
            load = loads[-1]
            load.local_baseline = (slices[-2].rate + slices[-1].rate) / 2
            print(f"  server {c} streams: {load.rate:.1f} tokens/s ({load.rate / load.local_baseline:.2f}x the "
                  f"generate 1-by-1 slices around it: {slices[-2].rate:.1f}, {slices[-1].rate:.1f}), TTFT p50 "
                  f"{load.ttft_p50_ms:.0f} ms, {load.mean_rows:.1f} rows/step (load average {load_average()})",
                  flush=True)
    baseline = combined(slices)
    rates = [s.rate for s in slices]
    if max(rates) > 1.25 * min(rates):
        print(f"warning: generate 1-by-1 ran at {min(rates):.1f} to {max(rates):.1f} tokens/s during the run: the "
              "machine was busy with something else, and the ratios are that much less certain", flush=True)
    print(report(baseline, loads), flush=True)
    (OUT / "generation.json").write_text(json.dumps(
        {"model": MODEL, "load_average": load_average(), "results": [x.as_dict() for x in [baseline, *loads]]},
        indent=2))
    wrote = [OUT / "generation.json"]
    if plot(baseline, loads, OUT / "generation.png"):
        wrote.append(OUT / "generation.png")
    print(f"\nwrote {' and '.join(map(str, wrote))}")
    return baseline, loads


if __name__ == "__main__":
    main(tuple(int(c) for c in sys.argv[1:]) or CONCURRENCY)
