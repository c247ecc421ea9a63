"""The typed pipeline tasks over HTTP: `POST /v1/pipelines/{task}` with `{"inputs": ..., "parameters": {...}}`,
answered with exactly what the transformers pipeline returns for that call.

One `PipelineShape` per task, declarative like the Python SDK's task codecs (clients/python/tasks):
which parameters the task takes (transformers' names), how the JSON inputs become the task's
inputs, and how the task's results are shaped as transformers shapes them (a single input gives
its result unwrapped, a list gives a list, and each task's own exceptions). The SDK shapes gRPC
responses by the same rules, and tests/test_http_pipelines.py holds the two equal. A custom task
that subclasses a built-in one takes its parent's shape; any other gets its inputs and results as
they are. `GET /v1/pipelines` lists the tasks served, their aliases and models.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pipeserve.server.adapters.http.errors import endpoint, json_body, json_object, unless_disconnected
from pipeserve.server.adapters.kserve_codecs import json_value
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, ModelNotFound
from pipeserve.server.tasks.registry import canonical_task_name, task_class, task_names, translation_languages

BODY_FIELDS = ("inputs", "parameters", "model", "model_version")

_SAMPLING = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
_SEQ2SEQ = (*_SAMPLING, "max_new_tokens", "max_length", "min_length", "num_beams", "no_repeat_ngram_size",
            "early_stopping", "length_penalty", "num_return_sequences", "clean_up_tokenization_spaces")


def as_list(inputs: Any) -> tuple[list[Any], bool]:
    """(inputs as a list, whether the caller sent a single input)."""
    if isinstance(inputs, list):
        return inputs, False
    return [inputs], True


class PipelineShape:
    """How one task speaks over /v1/pipelines."""

    #: The registered task name this shape serves (and, through their bases, the tasks derived from it).
    task: ClassVar[str] = ""
    #: Parameters the task takes, by transformers' names; None: any (a task without a shape).
    parameters: ClassVar[tuple[str, ...] | None] = ()

    def __init__(self, task_name: str):
        # The name the request used (an alias, or translation_xx_to_yy).
        self.task_name = task_name

    def check_parameters(self, params: dict[str, Any]) -> None:
        if self.parameters is None:
            return
        for key in params:
            if key not in self.parameters:
                allowed = ", ".join(self.parameters) or "none"
                raise InvalidArgument(f"parameters.{key}", f"is not a parameter of {self.task}; allowed: {allowed}")

    def request(self, inputs: Any, params: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """(the task's inputs, the task's parameters). By default: a text or a list of texts."""
        items, _ = as_list(inputs)
        return items, params

    def shape(self, results: list[Any], inputs: Any, params: dict[str, Any]) -> Any:
        """By default: a single input's result, or one per input."""
        _, single = as_list(inputs)
        return results[0] if single else results


class TextClassification(PipelineShape):
    """transformers 5's shapes: a text gives [best label], a {"text", "text_pair"} dict the best
    label itself; with top_k, the labels ranked (top_k null: every label; 0: none)."""

    task = "text-classification"
    parameters = ("top_k", "function_to_apply", "return_all_scores")

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        pairs = any(isinstance(item, dict) for item in items)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                item = json_object(item, f"inputs[{i}]", ("text", "text_pair"))
                if not isinstance(item.get("text"), str):
                    raise InvalidArgument(f"inputs[{i}].text", "is required: a string")
                out.append((item["text"], item.get("text_pair") or ""))
            else:
                out.append((item, "") if pairs else item)
        params = dict(params)
        if "top_k" in params:
            # The task's top_k 0 is every label, transformers' None; transformers' 0 (no label) is cut in shape().
            params["top_k"] = 0 if params["top_k"] is None else (params["top_k"] or 1)
        params["has_text_pairs"] = pairs
        return out, params

    def shape(self, results, inputs, params):
        labels = [[{"label": e["label"], "score": e["score"]} for e in r] for r in results]
        ranked = "top_k" in params
        if ranked and params["top_k"] == 0:
            labels = [[] for _ in labels]
        elif not ranked and not params.get("return_all_scores"):
            labels = [r[0] for r in labels]  # transformers' legacy result: the best label's dict
        if isinstance(inputs, str):
            return labels if not ranked else labels[0]
        return labels[0] if isinstance(inputs, dict) else labels


class ImageClassification(PipelineShape):
    """Images as base64 strings or data: URLs (data:image/png;base64,...)."""

    task = "image-classification"
    parameters = ("top_k", "function_to_apply")
    _DATA_URL = re.compile(r"^data:[^,;]*(;[^,;]*)*;base64,", re.IGNORECASE)

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        return [self.image(i, item) for i, item in enumerate(items)], params

    def image(self, index: int, item: Any) -> bytes:
        if not isinstance(item, str):
            raise InvalidArgument(f"inputs[{index}]", "must be an image as a base64 string or a data: URL")
        text = self._DATA_URL.sub("", item.strip(), count=1)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"inputs[{index}]", "is not base64: send the image file's bytes base64-encoded, "
                                  "or a data: URL (data:image/png;base64,...)") from None

    def shape(self, results, inputs, params):
        labels = [[{"label": e["label"], "score": e["score"]} for e in r] for r in results]
        return super().shape(labels, inputs, params)


class ZeroShotClassification(PipelineShape):
    task = "zero-shot-classification"
    parameters = ("candidate_labels", "hypothesis_template", "multi_label")

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        params = dict(params)
        labels = params.get("candidate_labels")
        if isinstance(labels, str):  # "a, b, c", as transformers takes it
            params["candidate_labels"] = [label.strip() for label in labels.split(",") if label.strip()]
        return items, params

    def shape(self, results, inputs, params):
        out = [{"sequence": r["sequence"], "labels": list(r["labels"]), "scores": list(r["scores"])} for r in results]
        return super().shape(out, inputs, params)


class TokenClassification(PipelineShape):
    task = "token-classification"
    parameters = ("aggregation_strategy", "ignore_labels")

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        params = dict(params)
        if isinstance(params.get("aggregation_strategy"), str):
            params["aggregation_strategy"] = params["aggregation_strategy"].lower()
        return items, params

    def shape(self, results, inputs, params):
        return super().shape([[_entity(e) for e in r] for r in results], inputs, params)


def _entity(e: dict[str, Any]) -> dict[str, Any]:
    if e.get("entity_group"):
        out: dict[str, Any] = {"entity_group": e["entity_group"], "score": e["score"]}
    else:
        out = {"entity": e.get("entity", ""), "score": e["score"], "index": e.get("index", 0)}
    out["word"] = e.get("word", "")
    out["start"] = e.get("start")
    out["end"] = e.get("end")
    return out


class QuestionAnswering(PipelineShape):
    """{"question", "context"}, or a list of them; transformers 4.x's shapes."""

    task = "question-answering"
    parameters = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len",
                  "handle_impossible_answer", "align_to_words")

    def request(self, inputs, params):
        items = inputs if isinstance(inputs, list) else [inputs]
        pairs = []
        for i, item in enumerate(items):
            item = json_object(item, f"inputs[{i}]" if isinstance(inputs, list) else "inputs", ("question", "context"))
            if not isinstance(item.get("question"), str) or not isinstance(item.get("context"), str):
                raise InvalidArgument(f"inputs[{i}]", "needs a question and a context, both strings")
            pairs.append((item["question"], item["context"]))
        return pairs, params

    def shape(self, results, inputs, params):
        outputs = []
        for answers in results:
            answers = [{"score": a["score"], "start": a["start"], "end": a["end"], "answer": a["answer"]}
                       for a in answers]
            outputs.append(answers[0] if len(answers) == 1 else answers)
        # As in 4.x, a single pair (or a list of one) gives its result unwrapped.
        return outputs[0] if len(outputs) == 1 else outputs


class FillMask(PipelineShape):
    task = "fill-mask"
    parameters = ("top_k", "targets")

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        params = dict(params)
        if isinstance(params.get("targets"), str):
            params["targets"] = [params["targets"]]
        return items, params

    def shape(self, results, inputs, params):
        outputs = []
        for per_input in results:
            masks = [[{"score": p["score"], "token": p["token"], "token_str": p["token_str"], "sequence": p["sequence"]}
                      for p in mask] for mask in per_input]
            # One mask: its predictions; several: one list per mask (transformers' shape).
            outputs.append(masks[0] if len(masks) == 1 else masks)
        # transformers unwraps a list of one input too.
        return outputs[0] if len(outputs) == 1 else outputs


class FeatureExtraction(PipelineShape):
    task = "feature-extraction"
    parameters = ("pooling", "normalize")

    def request(self, inputs, params):
        items, _ = as_list(inputs)
        # transformers' feature-extraction returns token embeddings: pooling none unless asked.
        return items, {"pooling": "none", **params}

    def shape(self, results, inputs, params):
        # Token-level features get transformers' batch axis of 1: [1, tokens, hidden].
        outputs = [[r.vector.tolist()] if r.vector.ndim == 2 else r.vector.tolist() for r in results]
        return super().shape(outputs, inputs, params)


class TextGeneration(PipelineShape):
    task = "text-generation"
    parameters = (*_SAMPLING, "max_new_tokens", "max_length", "stop_sequences", "stop_sequence", "return_full_text",
                  "num_return_sequences")

    def shape(self, results, inputs, params):
        out = [[{"generated_text": s["generated_text"]} for s in per_input] for per_input in results]
        return super().shape(out, inputs, params)


class Summarization(PipelineShape):
    task = "summarization"
    parameters = _SEQ2SEQ
    key = "summary_text"

    def shape(self, results, inputs, params):
        per_input = [[{self.key: s[self.key]} for s in r] for r in results]
        # transformers 4.x: a list with one dict per input when each has one output, else a list
        # of lists (one per input, num_return_sequences each).
        if all(len(outputs) == 1 for outputs in per_input):
            return [outputs[0] for outputs in per_input]
        return per_input[0] if not isinstance(inputs, list) else per_input


class Translation(Summarization):
    """translation_en_to_fr sets src_lang en and tgt_lang fr, as transformers' task name does."""

    task = "translation"
    parameters = (*_SEQ2SEQ, "src_lang", "tgt_lang")
    key = "translation_text"

    def request(self, inputs, params):
        items, params = super().request(inputs, params)
        languages = translation_languages(self.task_name)
        if languages and "src_lang" not in params and "tgt_lang" not in params:
            params = {**params, "src_lang": languages[0], "tgt_lang": languages[1]}
        return items, params


class AnyTask(PipelineShape):
    """A task without a shape of its own: inputs and results as they are."""

    parameters = None


SHAPES: dict[str, type[PipelineShape]] = {s.task: s for s in (
    TextClassification, TokenClassification, QuestionAnswering, FillMask, ZeroShotClassification, FeatureExtraction,
    ImageClassification, TextGeneration, Summarization, Translation,
)}


def shape_for(task_name: str) -> tuple[str, PipelineShape]:
    """(the canonical task, its shape); NOT_FOUND names the tasks there are."""
    canonical = canonical_task_name(task_name)
    if canonical is None:
        raise ModelNotFound(f"no task {task_name!r}; tasks: {', '.join(sorted(task_names()))}")
    for cls in task_class(canonical).__mro__:
        shape = SHAPES.get(vars(cls).get("name", ""))
        if shape is not None:
            return canonical, shape(task_name)
    shape = AnyTask(task_name)
    shape.task = canonical
    return canonical, shape


class PipelineResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=json_value).encode("utf-8")


class Pipelines:
    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane
        self.control = control
        self.run = endpoint(plane.gate)(self._run)
        self.list = endpoint(plane.gate)(self._list)

    def routes(self) -> list[BaseRoute]:
        return [Route("/v1/pipelines", self.list, methods=["GET"]),
                Route("/v1/pipelines/{task}", self.run, methods=["POST"])]

    async def _run(self, request: Request) -> Response:
        task, shape = shape_for(request.path_params["task"])
        doc = json_object(await json_body(request), "body", BODY_FIELDS)
        if "inputs" not in doc:
            raise InvalidArgument("inputs", "is required: one input, or a list of them")
        params = dict(json_object(doc.get("parameters") or {}, "parameters"))
        shape.check_parameters(params)
        model, version = _model(request, doc)
        inputs = doc["inputs"]
        items, task_params = shape.request(inputs, params)
        served, results = await unless_disconnected(
            request, self.plane.infer(task, items, task_params, model=model, version=version))
        return PipelineResponse(shape.shape(results, inputs, params),
                                headers={"pipeserve-model": served.name, "pipeserve-model-version": str(served.version)})

    async def _list(self, request: Request) -> Response:
        tasks: dict[str, dict[str, Any]] = {}
        for state in self.control.versions(ready_only=True):
            entry = tasks.setdefault(state.task, {"task": state.task, "aliases": _aliases(state.task), "models": []})
            if state.name not in entry["models"]:
                entry["models"].append(state.name)
        return JSONResponse({"tasks": [tasks[t] for t in sorted(tasks)]})


def _aliases(task: str) -> list[str]:
    try:
        return list(task_class(task).aliases)
    except KeyError:
        return []


def _model(request: Request, doc: dict[str, Any]) -> tuple[str, int]:
    """The model (and version) the request names in its query (?model=, ?version=) or body."""
    model = _one_of(request.query_params.get("model"), doc.get("model"), "model")
    version = _one_of(request.query_params.get("version"), doc.get("model_version"), "model_version")
    if model is not None and not isinstance(model, str):
        raise InvalidArgument("model", f"must be a model's name, got {model!r}")
    if version in (None, ""):
        return model or "", 0
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
        raise InvalidArgument("model_version", f"must be a positive number, got {version!r}")
    return model or "", version


def _one_of(query: str | None, body: Any, name: str) -> Any:
    if query is not None and body is not None and str(body) != query:
        raise InvalidArgument(name, f"the query says {query!r} and the body {body!r}; name it once")
    return body if body is not None else query


def routes(plane: DataPlane, control: ControlPlane) -> list[BaseRoute]:
    return Pipelines(plane, control).routes()

