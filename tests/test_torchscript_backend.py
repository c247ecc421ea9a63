"""The TorchScript backend: `pipeserve export --backend torchscript` and serving its output.

Every encoder task of the default repository is exported and must answer like eager to 1e-4, on
batches the task's own tokenizer or image processor makes (padding and sentence pairs included);
two of them are compared over the wire through the real server. Serving needs no transformers
model code; generation models export a decoder step without a KV cache.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeserve.backends.base import ModelSpec
from pipeserve.backends.eager import EagerBackend
from pipeserve.backends.torchscript import SIGNATURE_FILE, TorchScriptBackend, TorchScriptSignature
from pipeserve.client import pipeline
from pipeserve.server.cli import main as cli_main
from pipeserve.server.export.source import ExportError
from pipeserve.server.export.torchscript import export_torchscript
from pipeserve.server.repository.config import parse_model_config
from pipeserve.server.tasks.registry import canonical_task_name, task_class, task_names
from tests.conftest import server_settings
from tests.model_folders import add_model
from tests.server_harness import ServerThread

TOLERANCE = 1e-4
ENCODER_TASKS = ("text-classification", "token-classification", "question-answering", "fill-mask",
                 "zero-shot-classification", "feature-extraction", "image-classification")
GENERATION_TASKS = ("text-generation", "summarization", "translation", "text2text-generation")
SENTENCES = ["I love this!", "The quick brown fox jumps over the lazy dog while the others wait.", "ok"]
PAIRS = ["It is about sports.", "This text is about the weather in April."]


def _models_by_task(repo: Path, tasks: tuple[str, ...]) -> dict[str, str]:
    """The first model of the repository for each of `tasks` (by config; registered or not)."""
    found: dict[str, str] = {}
    for folder in sorted(repo.iterdir()):
        if not (folder / "config.pbtxt").is_file():
            continue
        task = parse_model_config(folder / "config.pbtxt").task
        task = canonical_task_name(task) or task
        if task in tasks and task not in found:
            found[task] = folder.name
    return found


@pytest.fixture(scope="module")
def export_repo(model_repository: Path, tmp_path_factory) -> Path:
    """A repository with the default repository's encoder models (and generation models) only."""
    repo = tmp_path_factory.mktemp("torchscript-repo")
    for task, name in {**_models_by_task(model_repository, ENCODER_TASKS),
                       **_models_by_task(model_repository, GENERATION_TASKS)}.items():
        add_model(repo, name, name, task=task)
    return repo


def _spec(folder: Path, name: str, task: str, model_class: str = "") -> ModelSpec:
    cls = task_class(task)
    return ModelSpec(name=name, version=1, local_path=folder, model_class=model_class or cls.model_class,
                     input_names=cls.input_names, output_names=cls.output_names)


def _task_batch(folder: Path, task: str) -> dict[str, torch.Tensor]:
    """What the task hands a backend: tokenizer output with padding (pairs for pair tasks), or
    image processor output."""
    if task == "image-classification":
        from PIL import Image
        from transformers import AutoImageProcessor

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (64, 64))]
        return dict(AutoImageProcessor.from_pretrained(folder)(images, return_tensors="pt"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if task in ("question-answering", "zero-shot-classification"):
        return dict(tokenizer(PAIRS, SENTENCES[:2], padding=True, return_tensors="pt"))
    if task == "fill-mask":
        return dict(tokenizer([f"The {tokenizer.mask_token} is red.", SENTENCES[1]], padding=True, return_tensors="pt"))
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


def test_every_encoder_task_answers_like_eager(export_repo: Path):
    tasks = _models_by_task(export_repo, ENCODER_TASKS)
    assert {"text-classification", "feature-extraction"} <= set(tasks), tasks
    for task, name in tasks.items():
        result = export_torchscript(export_repo, name)
        assert result.model_name == f"{name}-torchscript"
        assert max(result.max_difference.values()) <= TOLERANCE
        batch = _task_batch(result.folder, task)
        eager = EagerBackend().load(_spec(export_repo / name, name, task), torch.device("cpu"))
        scripted = TorchScriptBackend().load(_spec(result.folder, result.model_name, task), torch.device("cpu"))
        want, got = eager.run(batch), scripted.run(batch)
        # The same dict the eager backend returns: every output, same names, shapes and values.
        assert list(got) == list(want), (task, list(got), list(want))
        for key in want:
            assert got[key].shape == want[key].shape, (task, key)
            torch.testing.assert_close(got[key], want[key], atol=TOLERANCE, rtol=0, msg=f"{task}: {key}")
        if "token_type_ids" in batch and any(i.default for i in result.signature.inputs):
            # A task that sends no token_type_ids gets the zeros the model assumes.
            without = {k: v for k, v in batch.items() if k != "token_type_ids"}
            torch.testing.assert_close(scripted.run(without), eager.run(without), atol=TOLERANCE, rtol=0)
        eager.close()
        scripted.close()


def test_cli_adds_a_version_and_keeps_the_source(export_repo: Path, capsys):
    before = sorted(p.name for p in (export_repo / "sentiment").iterdir())
    assert cli_main(["export", "--backend", "torchscript", "sentiment", "--repository", str(export_repo),
                     "--name", "sentiment-ts"]) == 0
    assert cli_main(["export", "--backend", "torchscript", "sentiment", "--repository", str(export_repo),
                     "--name", "sentiment-ts"]) == 0
    out = capsys.readouterr().out
    assert "version 1" in out and "version 2" in out, out
    folder = export_repo / "sentiment-ts"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2", "config.pbtxt"]
    assert {"model.pt", SIGNATURE_FILE, "config.json", "tokenizer.json"} <= {p.name for p in (folder / "2").iterdir()}
    assert not list((folder / "2").glob("*.safetensors"))
    config = parse_model_config(folder / "config.pbtxt")
    assert (config.name, config.task, config.backend, config.default_for_task) == \
        ("sentiment-ts", "text-classification", "torchscript", False)
    assert sorted(p.name for p in (export_repo / "sentiment").iterdir()) == before
    assert parse_model_config(export_repo / "sentiment" / "config.pbtxt").backend == "eager"


def test_export_errors_say_why(export_repo: Path, capsys):
    with pytest.raises(ExportError, match="another model than its source"):
        export_torchscript(export_repo, "sentiment", name="sentiment")
    # An existing model of another backend is never overwritten.
    assert cli_main(["export", "--backend", "torchscript", "sentiment", "--repository", str(export_repo),
                     "--name", "minilm"]) == 2
    assert "serves with backend 'eager', not 'torchscript'" in capsys.readouterr().err
    # An exported model is not a source.
    if not (export_repo / "sentiment-torchscript").exists():
        export_torchscript(export_repo, "sentiment")
    with pytest.raises(ExportError, match="backend 'torchscript'"):
        export_torchscript(export_repo, "sentiment-torchscript")


def test_an_export_that_lacks_what_the_task_reads_does_not_load(export_repo: Path, tmp_path: Path):
    if not (export_repo / "sentiment-torchscript").exists():
        export_torchscript(export_repo, "sentiment")
    folder = export_repo / "sentiment-torchscript" / "1"
    # The classification export read as if a question-answering task wanted it.
    with pytest.raises(ValueError, match="start_logits.*export the model again"):
        TorchScriptBackend().load(ModelSpec(name="x", version=1, local_path=folder,
                                            input_names=("input_ids", "attention_mask"),
                                            output_names=("start_logits", "end_logits")), torch.device("cpu"))
    with pytest.raises(ValueError, match="torchscript.json"):
        TorchScriptBackend().load(_spec(tmp_path, "x", "text-classification"), torch.device("cpu"))


def test_served_over_the_wire_like_eager(export_repo: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    models = [("sentiment", "text-classification"), ("minilm", "feature-extraction")]
    generation = "text-generation" in task_names() and (export_repo / "gpt2").is_dir()
    if generation:
        models.append(("gpt2", "text-generation"))
    for name, task in models:
        add_model(repo, name, name, task=task)
        export_torchscript(repo, name)
    server = ServerThread(server_settings(repo)).start()
    try:
        for name in ("sentiment", "minilm"):
            summary = server.call(lambda n=name: server.server.registry.get(f"{n}-torchscript"))
            assert summary.settings.backend == "torchscript"
        eager = pipeline("text-classification", "sentiment", target=server.target)
        scripted = pipeline("text-classification", "sentiment-torchscript", target=server.target)
        raw = {"top_k": None, "function_to_apply": "none"}  # logits: a random model's scores sit near 0.5
        for w, g in zip(eager(SENTENCES, **raw), scripted(SENTENCES, **raw)):
            assert [x["label"] for x in w] == [x["label"] for x in g]
            np.testing.assert_allclose([x["score"] for x in g], [x["score"] for x in w], atol=TOLERANCE)
        eager = pipeline("feature-extraction", "minilm", target=server.target)
        scripted = pipeline("feature-extraction", "minilm-torchscript", target=server.target)
        for text in SENTENCES:
            np.testing.assert_allclose(np.array(scripted(text)), np.array(eager(text)), atol=TOLERANCE)
        if generation:  # through the continuous-batching engine: prefill/decode without a cache
            eager = pipeline("text-generation", "gpt2", target=server.target)
            scripted = pipeline("text-generation", "gpt2-torchscript", target=server.target)
            for prompt in ("Once upon a time", "The server"):
                want = eager(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)
                assert want[0]["generated_text"], want
                assert scripted(prompt, max_new_tokens=12, do_sample=False, return_full_text=False) == want
    finally:
        server.stop()


def test_serving_runs_no_transformers_code(export_repo: Path):
    """The backend alone, in a fresh interpreter: torch.jit.load, run, and transformers never imported."""
    if not (export_repo / "sentiment-torchscript").exists():
        export_torchscript(export_repo, "sentiment")
    folder = export_repo / "sentiment-torchscript" / "1"
    script = textwrap.dedent(f"""
        import sys, torch
        from pipeserve.backends.base import ModelSpec
        from pipeserve.backends.torchscript import TorchScriptBackend
        spec = ModelSpec(name="s", version=1, local_path=__import__("pathlib").Path({str(folder)!r}),
                         output_names=("logits",))
        instance = TorchScriptBackend().load(spec, torch.device("cpu"))
        out = instance.run({{"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}})
        assert out["logits"].shape == (1, 2), out
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
        print("transformers modules:", loaded)
        assert not loaded
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _greedy_steps(instance, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy decoding through prefill/decode, one row leaving half way. Returns each step's
    logits in the prompts' order (rows that left: NaN) and each prompt's tokens."""
    logits, state = instance.prefill(prompts)
    rows = list(range(len(prompts)))  # rows[i]: the prompt that row i of the state decodes
    seen, tokens = [], [[] for _ in prompts]
    for step in range(steps + 1):
        in_order = torch.full((len(prompts), logits.shape[-1]), float("nan"))
        in_order[rows] = logits
        seen.append(in_order)
        if step == steps:
            break
        nxt = logits.argmax(-1)
        for row, token in zip(rows, nxt.tolist()):
            tokens[row].append(token)
        if step == steps // 2:  # the first prompt finishes: the engine releases its row
            order = state.release([rows.index(0)])
            rows, nxt = [rows[i] for i in order], nxt[order]
        logits = instance.decode(state, nxt)
    return seen, tokens


def test_text_generation_decodes_step_by_step_without_a_cache(export_repo: Path):
    tasks = _models_by_task(export_repo, ("text-generation",))
    if "text-generation" not in tasks or "text-generation" not in task_names():
        pytest.skip("no text-generation model or task yet")
    name = tasks["text-generation"]
    result = export_torchscript(export_repo, name)
    assert result.signature.kind == "decoder-step" and result.signature.outputs[0] == "logits"
    scripted = TorchScriptBackend().load(_spec(result.folder, result.model_name, "text-generation"), torch.device("cpu"))
    eager = EagerBackend().load(_spec(export_repo / name, name, "text-generation"), torch.device("cpu"))
    assert scripted.supports_decoding
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    with torch.inference_mode():  # the eager RowCache's buffers are inference tensors
        want_logits, want_tokens = _greedy_steps(eager, prompts, 6)
    got_logits, got_tokens = _greedy_steps(scripted, prompts, 6)
    assert got_tokens == want_tokens
    for step, (got, want) in enumerate(zip(got_logits, want_logits)):
        torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0, equal_nan=True, msg=f"step {step}")
    # A second state joins the running one, as newly prefilled sequences join the batch.
    _, state = scripted.prefill([[5, 6]])
    _, other = scripted.prefill([[7, 8, 9]])
    state.extend(other)
    assert state.rows == 2 and other.rows == 0
    scripted.close()
    eager.close()


def test_encoder_decoder_generation_is_refused_with_the_reason(export_repo: Path):
    tasks = _models_by_task(export_repo, ("summarization", "translation"))
    registered = [n for t, n in tasks.items() if t in task_names()]
    if not registered:
        pytest.skip("no summarization or translation task yet")
    with pytest.raises(ExportError, match="encoder-decoder.*generate\\(\\) with a KV cache.*backend eager"):
        export_torchscript(export_repo, registered[0])


def test_signature_round_trips(tmp_path: Path):
    from pipeserve.backends.torchscript import InputSpec

    signature = TorchScriptSignature(inputs=(InputSpec("input_ids", "int64"), InputSpec("token_type_ids", "int64",
                                                                                       "zeros", "input_ids")),
                                     outputs=("logits",), task="text-classification")
    signature.write(tmp_path)
    assert TorchScriptSignature.read(tmp_path) == signature
