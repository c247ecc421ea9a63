"""Text classification: pipeserve against a real Triton Inference Server doing the same work, in one run.

For each model of bench/classification.py (tiny-classifier, distilbert-base: random weights, the
same 512 texts of 8 to 40 words), three servers on loopback, up at the same time:
  triton          tritonserver through PyTriton (bench/triton_classifier_server.py, run by the
                  Triton venv .venv-triton): per dynamic batch (max_batch_size 64, max queue delay
                  2 ms) the folder's tokenizer, a forward, a softmax and the best label; as many
                  instances and torch threads per instance as pipeserve's serving config gives
  pipeserve       `pipeserve serve` on the same folder, served as bench/classification.py serves it
                  (max_batch_size 32)
  pipeserve b64   the same with max_batch_size 64, so that both sides batch up to 64
All three are driven by the same client: Triton's own KServe v2 gRPC client (tritonclient.grpc.aio)
calling ModelInfer with one text per request (TEXT BYTES, [1] for pipeserve and [1, 1] for Triton's
batched model; LABEL and SCORE back), by N closed-loop clients (1, 16, 64), each on its own
connection, for SECONDS (8) per point after a warm-up (the model's in bench/classification.py).
Per point: texts/s, and the p50 and p99 of the request latencies. Before measuring, the servers'
answers to the first texts are compared (equal work gives equal labels and scores).

The servers take turns at each client count (pipeserve, pipeserve b64, Triton; the next round in
the reverse order), and with ROUNDS = 2 every point is measured twice and each server keeps its
better run (for one client the lower p50, else the higher rate), so that a burst of load from
elsewhere on the machine does not decide a ratio. The ratios and the targets compare
pipeserve b64 with Triton. Where this machine cannot run Triton (not Linux x86_64, no Debian
python3.11), says why and measures nothing.

    python -m bench versus_triton      (or `make bench` for every benchmark)
    BENCH_VERSUS_SECONDS=2 BENCH_VERSUS_WARMUP=1 BENCH_VERSUS_ROUNDS=1 python -m bench versus_triton
                                       (a quick check: seconds per point, warm-up, rounds)

Writes bench/out/versus_triton.json; the servers' logs are bench/out/versus-*.log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.classification import MODELS_DIR, PLANS, Plan, build_models, make_texts
from bench.harness import OUT, ROOT, BenchServer, Measurement, free_port, load_average, table, timed_calls

SECONDS = float(os.environ.get("BENCH_VERSUS_SECONDS", "8"))
# Warm-up before each point; unset, the model's own from bench/classification.py's PLANS (a few
# seconds for distilbert, whose requests at 64 clients take about as long).
WARMUP = float(os.environ["BENCH_VERSUS_WARMUP"]) if os.environ.get("BENCH_VERSUS_WARMUP") else None
ROUNDS = int(os.environ.get("BENCH_VERSUS_ROUNDS", "2"))
CONCURRENCY = (1, 16, 64)
TEXTS = 512
REPOSITORY = OUT / "versus_triton" / "repository"
SERVER_SCRIPT = ROOT / "bench" / "triton_classifier_server.py"
# Both sides batch up to this many requests, waiting at most 2 ms for them.
MAX_BATCH = 64
QUEUE_DELAY_US = 2000
# pipeserve's KServe v2 tensors for text-classification (server/adapters/kserve_classification_codecs.py);
# the Triton model's have the same names and dtypes (its shapes have the batch first: request_shape).
TEXT, LABEL, SCORE = "TEXT", "LABEL", "SCORE"
SIDES = ("pipeserve", "pipeserve b64", "triton")


def b64_serving(serving: str) -> str:
    """The plan's serving config with max_batch_size 64."""
    changed, count = re.subn(r"max_batch_size: \d+", f"max_batch_size: {MAX_BATCH}", serving)
    assert count == 1, serving
    return changed


def mirrored_instances(serving: str) -> tuple[int, int]:
    """(instances, torch threads per instance; 0: the cores split among them) of a serving config,
    for Triton to run the model as pipeserve does."""
    count = re.search(r"instance_group \[ \{ count: (\d+)", serving)
    threads = re.search(r'"intra_op_threads" value: "(\d+)"', serving)
    return int(count.group(1)) if count else 1, int(threads.group(1)) if threads else 0


def write_repository(plan: Plan) -> dict[str, str]:
    """pipeserve's two variants of the plan's model, on the model folder; {side: model name}."""
    names = {"pipeserve": plan.model, "pipeserve b64": f"{plan.model}-b64"}
    for name, serving in ((names["pipeserve"], plan.serving), (names["pipeserve b64"], b64_serving(plan.serving))):
        folder = REPOSITORY / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(
            f'name: "{name}"\ntask: "text-classification"\n'
            f'source {{ path: "{(MODELS_DIR / plan.model).resolve()}" }}\n{serving}')
    return names


# -- Triton -----------------------------------------------------------------------------------------


class TritonServer:
    """bench/triton_classifier_server.py in the Triton venv, serving one model folder on loopback."""

    def __init__(self, venv_python: Path, model_dir: Path, name: str, instances: int, threads: int):
        self.name = name
        self.grpc_port = free_port()
        ports = {self.grpc_port}
        while len(ports) < 3:  # HTTP and metrics: Triton opens them whether we use them or not
            ports.add(free_port())
        http_port, metrics_port = sorted(ports - {self.grpc_port})
        self.tmp = Path(tempfile.mkdtemp(prefix="versus-triton-"))
        self.args = [str(venv_python), str(SERVER_SCRIPT), "--model-dir", str(model_dir.resolve()),
                     "--model-name", name, "--grpc-port", str(self.grpc_port), "--http-port", str(http_port),
                     "--metrics-port", str(metrics_port), "--max-batch-size", str(MAX_BATCH),
                     "--max-queue-delay-us", str(QUEUE_DELAY_US), "--instances", str(instances),
                     "--threads", str(threads), "--workspace", str(self.tmp / "workspace")]
        self.log_path = OUT / f"versus-triton-{name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> TritonServer:
        env = dict(os.environ)
        # The main venv's settings must not leak into the Triton venv's interpreter.
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(var, None)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", "PYTRITON_HOME": str(self.tmp / "pytriton-home"),
                    "TMPDIR": str(self.tmp)})
        self._log = open(self.log_path, "wb")
        # Its own process group: tritonserver and its Python backend stubs are in it.
        self.proc = subprocess.Popen(self.args, cwd=self.tmp, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(300)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        with grpcclient.InferenceServerClient(self.target) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"Triton exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    if client.is_model_ready(self.name):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"Triton not serving {self.name} after {timeout}s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            # SIGTERM to the script, which stops tritonserver cleanly (its shared memory, its
            # model copies); whatever of the group is left after that is killed.
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait()
            self.proc = None
            self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the load: one KServe v2 client for both ---------------------------------------------------------


def text_inputs(texts: list[str], shape: list[int]) -> list[list]:
    """One TEXT tensor of `shape` per text, built up front so that the clients' own cost stays
    small; the client only reads them, so concurrent calls may share one."""
    import numpy as np
    from tritonclient.grpc import InferInput

    inputs = []
    for text in texts:
        tensor = InferInput(TEXT, shape, "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=object).reshape(shape))
        inputs.append([tensor])
    return inputs


def clients(target: str, count: int) -> list:
    from tritonclient.grpc.aio import InferenceServerClient

    # A local subchannel pool: each client on its own connection, not all on one shared.
    return [InferenceServerClient(target, channel_args=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(count)]


async def closed_loop(target: str, model: str, inputs: list[list], concurrency: int, side: str,
                      warmup: float) -> Measurement:
    """`concurrency` clients calling ModelInfer back to back, for SECONDS after `warmup`."""
    connected = clients(target, concurrency)
    try:
        for v2 in connected:
            await v2.is_server_ready()  # connects
        latencies, elapsed = await timed_calls(
            connected, lambda v2, n: v2.infer(model, inputs[n % len(inputs)]), seconds=SECONDS, warmup=warmup)
    finally:
        for v2 in connected:
            await v2.close()
    return Measurement(model, side, concurrency, len(latencies), elapsed, latencies)


async def request_shape(target: str, model: str) -> tuple[list[int], str]:
    """The shape of one text's TEXT tensor, from the model's v2 metadata, and its signature.

    The texts are the same bytes on both sides, but not the same shape: pipeserve's TEXT is
    [-1] (one row per input), a Triton model with dynamic batching takes [-1, 1] (the batch,
    then the model's own dims [1])."""
    [v2] = clients(target, 1)
    try:
        meta = await v2.get_model_metadata(model, as_json=True)
    finally:
        await v2.close()
    [text] = [t for t in meta["inputs"] if t["name"] == TEXT]
    shape = [1 if int(d) == -1 else int(d) for d in text["shape"]]
    return shape, f"{_specs(meta['inputs'])} -> {_specs(meta['outputs'])}"


async def agreement(targets: dict[str, tuple[str, str]], inputs: dict[str, list[list]], texts: int = 16) -> list[str]:
    """Whether pipeserve answers the first texts as Triton does: what makes this equal work."""
    answers = {}
    for side, (target, model) in targets.items():
        [v2] = clients(target, 1)
        try:
            answers[side] = [await v2.infer(model, tensors) for tensors in inputs[side][:texts]]
        finally:
            await v2.close()
    lines = []
    for side in ("pipeserve", "pipeserve b64"):
        pairs = list(zip(answers[side], answers["triton"]))
        labels = all(a.as_numpy(LABEL).reshape(-1)[0] == b.as_numpy(LABEL).reshape(-1)[0] for a, b in pairs)
        worst = max(abs(float(a.as_numpy(SCORE).reshape(-1)[0]) - float(b.as_numpy(SCORE).reshape(-1)[0]))
                    for a, b in pairs)
        lines.append(f"  {side} against triton on {texts} texts: labels "
                     f"{'agree' if labels else 'DIFFER'}, scores within {worst:.1e}")
    return lines


def _specs(tensors: list[dict]) -> str:
    return ", ".join(f"{t['name']} {t['datatype']} [{', '.join(str(d) for d in t.get('shape', []))}]" for t in tensors)


async def batch_sizes(target: str, model: str) -> dict[int, int]:
    """Batches the server ran by size, from the v2 ModelStatistics RPC (Triton's and pipeserve's)."""
    [v2] = clients(target, 1)
    try:
        stats = await v2.get_inference_statistics(model, as_json=True)
    finally:
        await v2.close()
    found = stats["model_stats"][0].get("batch_stats", [])
    return dict(sorted((int(b["batch_size"]), int(b["compute_infer"].get("count", 0))) for b in found))


# -- one model --------------------------------------------------------------------------------------


def better(old: Measurement | None, new: Measurement) -> Measurement:
    """For one client the run with the lower median latency, else the faster one."""
    if old is None:
        return new
    if new.concurrency == 1:
        return new if new.p50_ms < old.p50_ms else old
    return new if new.rate > old.rate else old


def measure(plan: Plan, triton_python: Path) -> dict:
    from transformers import AutoTokenizer

    folder = MODELS_DIR / plan.model
    texts = make_texts(AutoTokenizer.from_pretrained(folder), TEXTS)
    names = write_repository(plan)
    instances, threads = mirrored_instances(plan.serving)
    warmup = plan.warmup if WARMUP is None else WARMUP
    print(f"{plan.model}: pipeserve serves it with\n  " + plan.serving.strip().replace("\n", "\n  ")
          + f"\n  (and {names['pipeserve b64']} with max_batch_size {MAX_BATCH}); Triton with {instances} "
          f"instance(s) x {threads or 'cores / instances'} thread(s), max_batch_size {MAX_BATCH}, "
          f"max_queue_delay {QUEUE_DELAY_US} us", flush=True)
    with BenchServer(REPOSITORY, list(names.values()), log_name=f"versus-pipeserve-{plan.model}") as pipeserve, \
            TritonServer(triton_python, folder, plan.model, instances, threads) as triton:
        targets = {side: (pipeserve.target, name) for side, name in names.items()}
        targets["triton"] = (triton.target, plan.model)
        inputs = {}
        for side, (target, model) in targets.items():
            shape, signature = asyncio.run(request_shape(target, model))
            inputs[side] = text_inputs(texts, shape)
            print(f"  {side:<13} {model}: {signature}; one text per request: TEXT {shape}", flush=True)
        for line in asyncio.run(agreement(targets, inputs)):
            print(line, flush=True)
        kept: dict[tuple[str, int], Measurement] = {}
        for round_ in range(ROUNDS):
            for concurrency in CONCURRENCY:
                for side in SIDES if round_ % 2 == 0 else reversed(SIDES):
                    target, model = targets[side]
                    run = asyncio.run(closed_loop(target, model, inputs[side], concurrency, side, warmup))
                    print(f"  round {round_ + 1} c{concurrency:<3} {side:<13} {run.rate:8.1f}/s  "
                          f"p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms", flush=True)
                    kept[side, concurrency] = better(kept.get((side, concurrency)), run)
        batches = {side: asyncio.run(batch_sizes(*targets[side])) for side in SIDES}
    return {"rows": kept, "batches": batches, "warmup": warmup}


# -- the report -------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(results: dict[str, dict]) -> str:
    lines = []
    for model, found in results.items():
        rows = found["rows"]
        body = []
        for side in ("pipeserve b64", "pipeserve"):
            for c in CONCURRENCY:
                ours, theirs = rows[side, c], rows["triton", c]
                body.append((side, str(c), f"{ours.rate:.1f}", f"{ours.p50_ms:.2f}", f"{ours.p99_ms:.2f}",
                             f"{theirs.rate:.1f}", f"{theirs.p50_ms:.2f}", f"{theirs.p99_ms:.2f}",
                             ratio(ours.rate, theirs.rate), ratio(ours.p99_ms, theirs.p99_ms),
                             ratio(ours.p50_ms, theirs.p50_ms)))
        lines.append(f"\n{model}")
        lines.append(table(body, ("pipeserve", "clients", "texts/s", "p50 ms", "p99 ms", "Triton texts/s",
                                  "p50 ms", "p99 ms", "texts/s x", "p99 x", "p50 x")))
        for side, sizes in found["batches"].items():
            lines.append(f"batches {side} ran, by size (all runs): {sizes}")
    lines.append("\npipeserve: served as bench/classification.py serves the model; pipeserve b64: the same with "
                 f"max_batch_size {MAX_BATCH}")
    lines.append(f"ratios: pipeserve / Triton; {'the better of ' + str(ROUNDS) + ' interleaved runs, ' if ROUNDS > 1 else ''}"
                 f"{SECONDS:g} s per point after a warm-up of "
                 + ", ".join(f"{found['warmup']:g} s ({model})" for model, found in results.items()))
    lines.append("\ntargets (pipeserve b64 against Triton)")
    for name, measured, met in targets(results):
        lines.append(f"  [{'PASS' if met else 'MISS'}] {name}: {measured}")
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the tiny classifier's three."""
    if "tiny-classifier" not in results:
        return []
    rows = results["tiny-classifier"]["rows"]
    ours, theirs = rows["pipeserve b64", 64], rows["triton", 64]
    alone, alone_triton = rows["pipeserve b64", 1], rows["triton", 1]
    return [
        ("tiny-classifier, 64 clients: texts/s >= 1.5x Triton's",
         f"{ours.rate / theirs.rate:.2f}x ({ours.rate:.0f}/s vs {theirs.rate:.0f}/s)", ours.rate >= 1.5 * theirs.rate),
        ("tiny-classifier, 64 clients: p99 <= Triton's",
         f"{ours.p99_ms:.2f} vs {theirs.p99_ms:.2f} ms", ours.p99_ms <= theirs.p99_ms),
        ("tiny-classifier, 1 client: p50 < Triton's",
         f"{alone.p50_ms:.2f} vs {alone_triton.p50_ms:.2f} ms", alone.p50_ms < alone_triton.p50_ms),
    ]


def main() -> dict[str, dict] | None:
    from tests.triton_server.harness import ensure_venv, triton_available, triton_python

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ok, why = triton_available()
    if not ok:
        print(f"versus_triton: skipped, this machine cannot run Triton: {why}", flush=True)
        return None
    venv = ensure_venv()  # instant once built (`bash tests/prepare.d/triton.sh` builds it)
    OUT.mkdir(parents=True, exist_ok=True)
    before = load_average()
    print(f"pipeserve against Triton: {os.cpu_count()} cores, load average {before}, "
          f"{SECONDS:g} s per point, {ROUNDS} round(s)", flush=True)
    build_models()
    results = {plan.model: measure(plan, triton_python(venv)) for plan in PLANS}
    print(report(results), flush=True)
    after = load_average()
    print(f"load average before: {before}, after: {after}")
    (OUT / "versus_triton.json").write_text(json.dumps({
        "seconds_per_point": SECONDS, "rounds": ROUNDS, "load_average": [before, after],
        "models": {model: {"warmup": found["warmup"], "rows": [r.as_dict() for r in found["rows"].values()],
                           "batches": {side: sizes for side, sizes in found["batches"].items()}}
                   for model, found in results.items()},
        "targets": [{"target": name, "measured": measured, "met": met} for name, measured, met in targets(results)],
    }, indent=2))
    print(f"\nwrote {OUT / 'versus_triton.json'}")
    return results


if __name__ == "__main__":
    main()
