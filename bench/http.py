"""HTTP against gRPC: the same workloads through each protocol of one server, in one run.

One server subprocess listens on both ports and serves two overhead-bound models, so that what
the protocols cost shows (a big model would hide it behind its forward passes):
  tiny-classifier  unary classification of texts of 8 to 40 words (bench.classification's texts),
                   by N closed-loop clients over
                     gRPC        pipeserve.v1 TextClassificationService.Classify
                     gRPC v2     KServe v2 ModelInfer (tensors TEXT -> LABEL, SCORE)
                     HTTP v2     POST /v2/models/tiny-classifier/infer, JSON tensors (the same v2 call)
  gpt2             streaming generation (the default repository's tiny GPT-2; greedy; prompts of 8 to
                   64 tokens, 32 to 96 new tokens: bench.generation's workload), by N streams over
                     gRPC        pipeserve.v1 TextGenerationService.GenerateStream
                     HTTP OpenAI POST /v1/completions with stream: true (server-sent events)
Each client has its own connection (HTTP: its own httpx client, keep-alive) and sends its next
request when the previous one ended. Per row: requests/s (streams: generated tokens/s, from each
finished request's usage), request latency p50/p99 (streams: to the last event) and, for streams,
time to the first token. The protocols take turns at each client count, so that a load elsewhere
on the shared machine touches them alike; the overhead column compares each HTTP row with the
gRPC row of the same call at the same client count.

Per row also the CPU the server process (all its threads) and the clients (this process) spent in the
window, per request or token: what each protocol costs, apart from what the shared cores allow.

Prints the table and writes bench/out/http.json.
    python -m bench http      (or `make bench` for every benchmark)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import OUT, BenchServer, free_port, load_average, percentile, table

MODELS_DIR = OUT / "models"
REPOSITORY = OUT / "http-repository"
CLASSIFIER = "tiny-classifier"
GENERATOR = "gpt2"
SERVING = {
    # As bench.classification serves it.
    CLASSIFIER: ('task: "text-classification"\nmax_batch_size: 32\n'
                 'dynamic_batching { max_queue_delay_microseconds: 2000 }\n'
                 'backend_parameters { key: "intra_op_threads" value: "1" }\n'),
    GENERATOR: ('task: "text-generation"\ngeneration { max_concurrent_sequences: 32 }\n'
                'backend_parameters { key: "intra_op_threads" value: "1" }\n'),
}
UNARY_CLIENTS = (1, 16, 64)
STREAM_CLIENTS = (1, 16)
UNARY_WARMUP, UNARY_WINDOW = 1.5, 6.0
STREAM_WARMUP, STREAM_WINDOW = 3.0, 10.0
TEXTS = 2048


@dataclass
class Row:
    """One line of the table: `count` requests finished in the window (tokens for streams)."""

    workload: str
    protocol: str
    clients: int
    count: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    # CPU seconds in the window: the server process (every thread), and this process (the clients).
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    def cpu_us(self, seconds: float) -> float:
        """CPU microseconds per counted item (request or token)."""
        return seconds / self.count * 1e6 if self.count else 0.0

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def ms(self, values: list[float], q: float) -> float:
        return percentile(values, q) * 1e3

    def as_dict(self) -> dict:
        return {"workload": self.workload, "protocol": self.protocol, "clients": self.clients, "count": self.count,
                "seconds": self.seconds, "per_second": self.rate, "p50_ms": self.ms(self.latencies, 50),
                "p99_ms": self.ms(self.latencies, 99), "ttft_p50_ms": self.ms(self.ttft, 50),
                "ttft_p99_ms": self.ms(self.ttft, 99), "requests": len(self.latencies),
                "server_cpu_us_per_item": self.cpu_us(self.server_cpu),
                "client_cpu_us_per_item": self.cpu_us(self.client_cpu)}


def build_models() -> Path:
    from pipeserve.model_builder import build_default_repository

    built = build_default_repository(MODELS_DIR, only={CLASSIFIER, GENERATOR})
    if built:
        print(f"built {', '.join(built)} into {MODELS_DIR}")
    for name, serving in SERVING.items():
        folder = REPOSITORY / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(
            f'name: "{name}"\n{serving}source {{ path: "{(MODELS_DIR / name).resolve()}" }}\n')
    return REPOSITORY


# -- the closed loop ----------------------------------------------------------------------------------


@dataclass
class Window:
    count: int
    latencies: list[float]
    ttfts: list[float]
    seconds: float
    server_cpu: float
    client_cpu: float


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def closed_loop(clients: list, call: Callable[[object, int], Awaitable[tuple[int, float | None]]], *,
                      warmup: float, window: float, server_pid: int) -> Window:
    """Each client calls back to back; call(client, n) returns (what it counts, seconds to its first
    token or None). Counts what finished inside the window, and the CPU both sides spent in it."""
    counted, latencies, ttfts = 0, [], []
    opens = time.perf_counter() + warmup
    closes = opens + window
    cpu: dict[str, float] = {}

    async def sample() -> None:
        await asyncio.sleep(opens - time.perf_counter())
        cpu["server"], cpu["client"] = cpu_seconds(server_pid), time.process_time()
        await asyncio.sleep(closes - time.perf_counter())
        cpu["server"], cpu["client"] = cpu_seconds(server_pid) - cpu["server"], time.process_time() - cpu["client"]

    async def run(index: int, client: object) -> None:
        nonlocal counted
        n = index
        while time.perf_counter() < closes:
            sent = time.perf_counter()
            count, first = await call(client, n)
            ended = time.perf_counter()
            if opens <= sent and ended < closes:
                counted += count
                latencies.append(ended - sent)
                if first is not None:
                    ttfts.append(first)
            n += len(clients)

    await asyncio.gather(sample(), *(run(i, c) for i, c in enumerate(clients)))
    return Window(counted, latencies, ttfts, window, cpu["server"], cpu["client"])


# -- unary classification -------------------------------------------------------------------------------


async def classify_rows(server: BenchServer, http_port: int, texts: list[str], clients: int) -> list[Row]:
    import grpc
    import httpx
    from pipeserve.v1 import text_classification_pb2 as tc
    from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
    from tritonclient.grpc import service_pb2 as v2
    from tritonclient.grpc import service_pb2_grpc as v2_grpc

    options = [("grpc.use_local_subchannel_pool", 1)]
    rows = []

    async def grpc_typed(stub, n):
        await stub.Classify(tc.ClassifyRequest(model=CLASSIFIER, inputs=[texts[n % len(texts)]], top_k=1))
        return 1, None

    def v2_request(n: int) -> v2.ModelInferRequest:
        tensor = v2.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(texts[n % len(texts)].encode())
        return v2.ModelInferRequest(model_name=CLASSIFIER, inputs=[tensor])

    async def grpc_v2(stub, n):
        await stub.ModelInfer(v2_request(n))
        return 1, None

    async def http_v2(client, n):
        body = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [texts[n % len(texts)]]}]}
        reply = await client.post(f"/v2/models/{CLASSIFIER}/infer", json=body)
        reply.raise_for_status()
        return 1, None

    for protocol, kind, call in (("gRPC", "grpc", grpc_typed), ("gRPC v2", "v2", grpc_v2),
                                 ("HTTP v2", "http", http_v2)):
        if kind == "http":
            connections = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120)
                           for _ in range(clients)]
            stubs = connections
        else:
            connections = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(clients)]
            stubs = [(tc_grpc.TextClassificationServiceStub if kind == "grpc" else v2_grpc.GRPCInferenceServiceStub)(ch)
                     for ch in connections]
        try:
            measured = await closed_loop(stubs, call, warmup=UNARY_WARMUP, window=UNARY_WINDOW,
                                         server_pid=server.proc.pid)
        finally:
            for connection in connections:
                await (connection.aclose() if kind == "http" else connection.close())
        rows.append(Row(CLASSIFIER, protocol, clients, measured.count, measured.seconds, measured.latencies,
                        server_cpu=measured.server_cpu, client_cpu=measured.client_cpu))
    return rows


# -- streaming generation ----------------------------------------------------------------------------------


async def stream_rows(server: BenchServer, http_port: int, requests: list[tuple[str, int]], clients: int) -> list[Row]:
    import grpc
    import httpx
    from pipeserve.v1 import text_generation_pb2 as pb
    from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc

    options = [("grpc.use_local_subchannel_pool", 1)]

    async def grpc_stream(stub, n):
        prompt, new = requests[n % len(requests)]
        sent, first, tokens = time.perf_counter(), None, 0
        message = pb.GenerateStreamRequest(model=GENERATOR, input=prompt, parameters=pb.GenerationParameters(
            max_new_tokens=new, do_sample=False))
        async for reply in stub.GenerateStream(message):
            if first is None and reply.token_ids:
                first = time.perf_counter() - sent
            if reply.finish_reason:
                tokens = reply.usage.generated_tokens
        return tokens, first

    async def openai_stream(client, n):
        prompt, new = requests[n % len(requests)]
        sent, first, tokens = time.perf_counter(), None, 0
        body = {"model": GENERATOR, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"]:
                    first = time.perf_counter() - sent
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return tokens, first

    rows = []
    for protocol, call in (("gRPC", grpc_stream), ("HTTP OpenAI", openai_stream)):
        if call is openai_stream:
            connections = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=120)
                           for _ in range(clients)]
            stubs = connections
        else:
            connections = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(clients)]
            stubs = [pb_grpc.TextGenerationServiceStub(ch) for ch in connections]
        try:
            measured = await closed_loop(stubs, call, warmup=STREAM_WARMUP, window=STREAM_WINDOW,
                                         server_pid=server.proc.pid)
        finally:
            for connection in connections:
                await (connection.aclose() if call is openai_stream else connection.close())
        rows.append(Row(GENERATOR, protocol, clients, measured.count, measured.seconds, measured.latencies,
                        measured.ttfts, measured.server_cpu, measured.client_cpu))
    return rows


# -- the report ---------------------------------------------------------------------------------------------


def overhead(row: Row, rows: list[Row]) -> str:
    """An HTTP row against the gRPC row of the same call (v2 REST against v2 gRPC) and clients."""
    against = {"HTTP v2": "gRPC v2", "HTTP OpenAI": "gRPC"}.get(row.protocol)
    base = next((r for r in rows if (r.workload, r.protocol, r.clients) == (row.workload, against, row.clients)), None)
    if base is None or not base.rate:
        return "-"
    rate = row.rate / base.rate - 1
    p50 = row.ms(row.latencies, 50) - base.ms(base.latencies, 50)
    return f"{rate:+.0%} rate, {p50:+.1f} ms p50 vs {against}"


def report(rows: list[Row]) -> str:
    lines = []
    for workload, unit in ((CLASSIFIER, "requests/s"), (GENERATOR, "tokens/s")):
        body = []
        for r in (r for r in rows if r.workload == workload):
            body.append((r.protocol, str(r.clients), f"{r.rate:.1f}", f"{r.ms(r.latencies, 50):.2f}",
                         f"{r.ms(r.latencies, 99):.2f}",
                         f"{r.ms(r.ttft, 50):.1f}" if r.ttft else "-", f"{r.ms(r.ttft, 99):.1f}" if r.ttft else "-",
                         f"{r.cpu_us(r.server_cpu):.0f}", f"{r.cpu_us(r.client_cpu):.0f}", overhead(r, rows)))
        per = "request" if unit == "requests/s" else "token"
        lines += [f"\n{workload}", table(body, ("protocol", "clients", unit, "p50 ms", "p99 ms", "TTFT p50",
                                                "TTFT p99", f"server CPU us/{per}", f"client CPU us/{per}",
                                                "overhead"))]
    lines.append("(CPU: the server process's, all threads, and this process's (the clients'), over the window, "
                 "per request or token counted in it)")
    return "\n".join(lines)


def main() -> list[Row]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"HTTP benchmark ({os.cpu_count()} cores, load average {load_average()})", flush=True)
    repository = build_models()
    from transformers import AutoTokenizer

    from bench.classification import make_texts
    from bench.generation import make_requests

    texts = make_texts(AutoTokenizer.from_pretrained(MODELS_DIR / CLASSIFIER), TEXTS)
    requests = make_requests(AutoTokenizer.from_pretrained(MODELS_DIR / GENERATOR))
    http_port = free_port()
    rows: list[Row] = []
    with BenchServer(repository, [CLASSIFIER, GENERATOR], "--http-port", str(http_port), log_name="server-http") \
            as server:
        for clients in UNARY_CLIENTS:
            rows += asyncio.run(classify_rows(server, http_port, texts, clients))
            print("  " + "; ".join(f"{r.protocol} x{r.clients}: {r.rate:.0f}/s" for r in rows[-3:]), flush=True)
        for clients in STREAM_CLIENTS:
            rows += asyncio.run(stream_rows(server, http_port, requests, clients))
            print("  " + "; ".join(f"{r.protocol} x{r.clients}: {r.rate:.0f} tokens/s" for r in rows[-2:]), flush=True)
    print(report(rows), flush=True)
    (OUT / "http.json").write_text(json.dumps({"load_average": load_average(),
                                               "results": [r.as_dict() for r in rows]}, indent=2))
    print(f"\nwrote {OUT / 'http.json'}")
    return rows


if __name__ == "__main__":
    main()
