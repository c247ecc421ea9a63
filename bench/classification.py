"""Text classification: pipeserve over gRPC against transformers in-process, on the same model and inputs.

For each model (random weights, inputs of 8 to 40 words):
  pipeline 1-by-1    transformers' pipeline called one text at a time (per-call latency)
  pipeline b32       transformers' pipeline over all texts with batch_size=32
  raw bN             tokenizer + forward under inference_mode, batches of N in arrival order
  raw sorted bN      the same with the texts sorted by length first (little padding): the bound
  server cN          pipeserve on loopback (a subprocess), N asyncio clients calling back to back

Prints the table and the targets, and writes bench/out/classification.{json,png}.
    python -m bench classification      (or `make bench` for every benchmark)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.harness import OUT, BenchServer, Measurement, closed_loop, load_average, table

MODELS_DIR = OUT / "models"
SEED = 0


@dataclass(frozen=True)
class Plan:
    """What to measure for one model, sized to keep the whole run within a few minutes."""

    model: str
    texts: int
    one_by_one: int
    raw_batches: tuple[int, ...]
    concurrency: tuple[int, ...]
    seconds: float
    warmup: float


PLANS = (
    Plan("tiny-classifier", texts=2048, one_by_one=1000, raw_batches=(1, 8, 32, 64),
         concurrency=(1, 4, 16, 64), seconds=5.0, warmup=1.5),
    Plan("distilbert-base", texts=256, one_by_one=128, raw_batches=(4, 8, 16, 32),
         concurrency=(1, 4, 16, 64), seconds=12.0, warmup=6.0),
)


def build_models() -> Path:
    """The two models, built once into the bench cache with their default serving configs."""
    from pipeserve.server.repository.default_models import build_default_repository

    built = build_default_repository(MODELS_DIR, only={plan.model for plan in PLANS})
    if built:
        print(f"built {', '.join(built)} into {MODELS_DIR}")
    return MODELS_DIR


def make_texts(tokenizer, count: int, seed: int = SEED) -> list[str]:
    """`count` texts of 8 to 40 whole words from the tokenizer's vocabulary."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) >= 3)
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40))) for _ in range(count)]


# -- transformers in-process ------------------------------------------------------------------------


def measure_in_process(plan: Plan, folder: Path) -> tuple[list[Measurement], list[str]]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    texts = make_texts(tokenizer, plan.texts)
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    rows = []

    pipe(texts[:8])
    latencies = []
    started = time.perf_counter()
    for text in texts[: plan.one_by_one]:
        t = time.perf_counter()
        pipe(text)
        latencies.append(time.perf_counter() - t)
    rows.append(Measurement(plan.model, "pipeline 1-by-1", 1, plan.one_by_one, time.perf_counter() - started, latencies))

    started = time.perf_counter()
    pipe(texts, batch_size=32)
    rows.append(Measurement(plan.model, "pipeline b32", 1, len(texts), time.perf_counter() - started))

    def raw(order: Sequence[str], batch: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(order), batch):
                features = tokenizer(list(order[i: i + batch]), padding=True, truncation=True, return_tensors="pt")
                model(**features).logits.numpy()
        return time.perf_counter() - started

    by_length = sorted(texts, key=len)
    raw(texts[:64], 32)  # warm
    for batch in plan.raw_batches:
        rows.append(Measurement(plan.model, f"raw b{batch}", 1, len(texts), raw(texts, batch)))
        rows.append(Measurement(plan.model, f"raw sorted b{batch}", 1, len(texts), raw(by_length, batch)))
    return rows, texts


# -- pipeserve over gRPC ----------------------------------------------------------------------------


def measure_server(plan: Plan, repository: Path, texts: list[str]) -> list[Measurement]:
    from pipeserve.v1 import text_classification_pb2 as pb
    from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc

    # Requests built up front: the clients' own cost stays as small as a client's can be.
    requests = [pb.ClassifyRequest(inputs=[t], model=plan.model) for t in texts]

    async def call(stub, n: int):
        return await stub.Classify(requests[n % len(requests)])

    rows = []
    with BenchServer(repository, [plan.model], log_name=f"server-{plan.model}") as server:
        for concurrency in plan.concurrency:
            rows.append(asyncio.run(closed_loop(
                server.target, concurrency, pb_grpc.TextClassificationServiceStub, call,
                seconds=plan.seconds, warmup=plan.warmup, model=plan.model)))
            print(f"  server c{concurrency}: {rows[-1].rate:.0f}/s p50 {rows[-1].p50_ms:.2f} ms", flush=True)
        rows[-1].batch_sizes = _batch_sizes(server.target, plan.model)
    return rows


def _batch_sizes(target: str, model: str) -> dict[int, int]:
    import grpc

    from pipeserve.v1 import model_service_pb2 as ms
    from pipeserve.v1 import model_service_pb2_grpc as ms_grpc

    with grpc.insecure_channel(target) as channel:
        found = ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest(name=model))
    return dict(sorted(found.models[0].batch_sizes.items()))


# -- the report -------------------------------------------------------------------------------------


def best(rows: list[Measurement], prefix: str) -> Measurement:
    return max((r for r in rows if r.mode.startswith(prefix)), key=lambda r: r.rate)


def server_at(rows: list[Measurement], concurrency: int) -> Measurement:
    return next(r for r in rows if r.mode == "server" and r.concurrency == concurrency)


def targets(results: dict[str, list[Measurement]]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's three targets."""
    found = []
    if "distilbert-base" in results:
        rows = results["distilbert-base"]
        bound = best(rows, "raw sorted")
        ratio = server_at(rows, 64).rate / bound.rate
        found.append(("distilbert-base c64 >= 90% of the length-grouped raw bound",
                      f"{ratio:.0%} ({server_at(rows, 64).rate:.1f}/s vs {bound.mode} {bound.rate:.1f}/s)", ratio >= 0.9))
    if "tiny-classifier" in results:
        rows = results["tiny-classifier"]
        one = next(r for r in rows if r.mode == "pipeline 1-by-1")
        ratio = server_at(rows, 64).rate / one.rate
        found.append(("tiny-classifier c64 >= 2x the pipeline called one text at a time",
                      f"{ratio:.2f}x ({server_at(rows, 64).rate:.0f}/s vs {one.rate:.0f}/s)", ratio >= 2))
        extra = server_at(rows, 1).p50_ms - one.p50_ms
        found.append(("tiny-classifier c1 p50 <= in-process call p50 + 1 ms",
                      f"+{extra:.2f} ms ({server_at(rows, 1).p50_ms:.2f} vs {one.p50_ms:.2f} ms)", extra <= 1.0))
    return found


def report(results: dict[str, list[Measurement]]) -> str:
    lines = []
    for model, rows in results.items():
        one = next(r for r in rows if r.mode == "pipeline 1-by-1")
        bound = best(rows, "raw sorted")
        body = []
        for r in rows:
            latency = (f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}") if r.latencies else ("-", "-")
            body.append((r.mode, str(r.concurrency), f"{r.rate:.1f}", *latency,
                         f"{r.rate / one.rate:.2f}x", f"{r.rate / bound.rate:.0%}"))
        lines.append(f"\n{model}")
        lines.append(table(body, ("mode", "clients", "texts/s", "p50 ms", "p99 ms", "vs 1-by-1", "vs bound")))
        batches = server_at(rows, max(r.concurrency for r in rows if r.mode == "server")).batch_sizes
        if batches:
            lines.append(f"batch sizes the server ran (whole run): {batches}")
    lines.append("\ntargets")
    for name, measured, met in targets(results):
        lines.append(f"  [{'met' if met else 'MISSED'}] {name}: {measured}")
    return "\n".join(lines)


def plot(results: dict[str, list[Measurement]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for col, (model, rows) in enumerate(results.items()):
        served = [r for r in rows if r.mode == "server"]
        xs = [r.concurrency for r in served]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [r.rate for r in served], "o-", label="pipeserve (gRPC)")
        for mode, style in (("pipeline 1-by-1", ":"), ("pipeline b32", "-."), ("raw sorted", "--")):
            ref = best(rows, mode)
            top.axhline(ref.rate, linestyle=style, color="gray", label=f"in-process {ref.mode}")
        top.set(title=f"{model}: throughput", xscale="log", xlabel="concurrent clients", ylabel="texts/s")
        top.set_xticks(xs, [str(x) for x in xs])
        top.legend(fontsize=8)
        bottom.plot(xs, [r.p50_ms for r in served], "o-", label="p50")
        bottom.plot(xs, [r.p99_ms for r in served], "s--", label="p99")
        bottom.axhline(best(rows, "pipeline 1-by-1").p50_ms, linestyle=":", color="gray", label="in-process call p50")
        bottom.set(title=f"{model}: latency", xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms")
        bottom.set_xticks(xs, [str(x) for x in xs])
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(models: Sequence[str] = ()) -> dict[str, list[Measurement]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"classification benchmark ({os.cpu_count()} cores, load average {load_average()})", flush=True)
    repository = build_models()
    results: dict[str, list[Measurement]] = {}
    for plan in PLANS:
        if models and plan.model not in models:
            continue
        print(f"{plan.model}: in-process", flush=True)
        rows, texts = measure_in_process(plan, repository / plan.model)
        print(f"{plan.model}: server", flush=True)
        rows += measure_server(plan, repository, texts)
        results[plan.model] = rows
    print(report(results), flush=True)
    (OUT / "classification.json").write_text(json.dumps(
        {model: [r.as_dict() for r in rows] for model, rows in results.items()}, indent=2))
    plot(results, OUT / "classification.png")
    print(f"\nwrote {OUT / 'classification.json'} and {OUT / 'classification.png'}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
