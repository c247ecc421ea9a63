"""Bad input, for every service the server exposes: each request gets the right status and a clear
message, nothing crashes, no queue slot leaks, and the server answers a normal request right after.

The services come from `server.adapters.services()`, and requests for them are generated from
their protobuf descriptors (tests/proto_strategies.py), so a service added later is covered
without a change here. Mutating RPCs (load/unload) are left out of the random sweep; the
security tests send them hostile names.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeserve.server.adapters import services
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import MAX_INPUTS_PER_REQUEST, DataPlane
from pipeserve.server.model_registry import ModelRegistry
from pipeserve.server.repository.repository import ModelRepository
from pipeserve.v1 import model_service_pb2 as ms_pb
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from tests.conftest import server_settings
from tests.proto_strategies import messages, string_field_paths, texts, with_string
from tests.server_harness import ServerThread

CALL_TIMEOUT_S = 30
# The statuses bad input may get. UNKNOWN and INTERNAL mean the server failed, never the client.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.OUT_OF_RANGE}
MUTATING = {"LoadModel", "UnloadModel", "RepositoryModelLoad", "RepositoryModelUnload"}
FUZZ = settings(max_examples=20, deadline=60_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _service_names() -> list[str]:
    """The services `services()` lists, read at collection time (building servicers loads nothing)."""
    registry = ModelRegistry(ModelRepository(Path("/nonexistent")))
    plane = DataPlane(registry)
    return [s.full_name for s in services(plane, ControlPlane(registry, plane.gate))]


SERVICE_NAMES = _service_names()


def service(name: str) -> ServiceDescriptor:
    return descriptor_pool.Default().FindServiceByName(name)


# -- images, good and bad --------------------------------------------------------------------------------


def png(width: int = 24, height: int = 24) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR chunk claiming `width` x `height`, and no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


GOOD_PNG = png()
MALFORMED_IMAGES = {
    "empty": b"",
    "text": b"not an image at all",
    "truncated-png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "header-only": png_header(24, 24),
    "decompression-bomb": png_header(100_000, 100_000),
    "zero-size": png_header(0, 0),
    "gif-magic-only": b"GIF89a",
    "corrupt-pixels": GOOD_PNG[:40] + bytes(len(GOOD_PNG) - 40),
}
images = st.one_of(st.sampled_from([GOOD_PNG, *MALFORMED_IMAGES.values()]), st.binary(max_size=64))


# -- calling any method with any message ---------------------------------------------------------------------


def invoke(channel: grpc.Channel, method: MethodDescriptor, request: Message | bytes) -> tuple[grpc.StatusCode, str, list]:
    """Calls `method` with a message (or raw bytes); returns (status, details, responses)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = (lambda b: b) if isinstance(request, bytes) else (lambda m: m.SerializeToString())
    parse = message_factory.GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming and method.server_streaming:
            responses = list(channel.stream_stream(path, serialize, parse)(iter([request]), timeout=CALL_TIMEOUT_S))
        elif method.server_streaming:
            responses = list(channel.unary_stream(path, serialize, parse)(request, timeout=CALL_TIMEOUT_S))
        elif method.client_streaming:
            responses = [channel.stream_unary(path, serialize, parse)(iter([request]), timeout=CALL_TIMEOUT_S)]
        else:
            responses = [channel.unary_unary(path, serialize, parse)(request, timeout=CALL_TIMEOUT_S)]
    except grpc.RpcError as error:
        return error.code(), error.details() or "", []
    return grpc.StatusCode.OK, "", responses


def assert_clean(method: MethodDescriptor, request: object, code: grpc.StatusCode, details: str, responses: list) -> None:
    where = f"{method.full_name}({str(request)[:300]!r})"
    assert code == grpc.StatusCode.OK or code in CLIENT_ERRORS, f"{where} -> {code}: {details}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{where} -> {code} without a message"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # "field: why", as every InvalidArgument reads.
        assert ": " in details, f"{where} -> a message that names no field: {details!r}"
    for response in responses:  # KServe streams report errors in band
        in_band = getattr(response, "error_message", "")
        assert "internal error" not in in_band, f"{where} -> {in_band}"


# -- what the server must still do afterwards ---------------------------------------------------------------


def normal_request(method: MethodDescriptor) -> Message:
    """A request a healthy server answers: known shapes for known services, else generic inputs."""
    cls = message_factory.GetMessageClass(method.input_type)
    name = method.containing_service.full_name
    if name == "pipeserve.v1.QuestionAnsweringService":
        return cls(inputs=[{"question": "Where is the cat?", "context": "The cat sits on the mat."}])
    if name == "pipeserve.v1.ZeroShotClassificationService":
        return cls(inputs=["I love this"], candidate_labels=["happy", "sad"])
    if name == "pipeserve.v1.FillMaskService":
        return cls(inputs=["Paris is the [MASK] of France."])
    if name == "pipeserve.v1.ImageClassificationService":
        return cls(inputs=[GOOD_PNG])
    if name == "inference.GRPCInferenceService":
        return cls(model_name="sentiment", inputs=[{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                                    "contents": {"bytes_contents": [b"I love this"]}}])
    request = cls()
    fields = method.input_type.fields_by_name
    if "inputs" in fields and fields["inputs"].type == FieldDescriptor.TYPE_STRING:
        request.inputs.append("Hello world, this is a normal request.")
    elif "input" in fields and fields["input"].type == FieldDescriptor.TYPE_STRING:
        request.input = "Hello world, this is a normal request."
    parameters = fields.get("parameters")
    if parameters is not None and parameters.message_type is not None and "max_new_tokens" in parameters.message_type.fields_by_name:
        request.parameters.max_new_tokens = 4
    return request


def inference_method(svc: ServiceDescriptor) -> MethodDescriptor | None:
    """The method a normal request exercises: the first unary one, ModelInfer for KServe."""
    if svc.full_name == "inference.GRPCInferenceService":
        return svc.methods_by_name["ModelInfer"]
    if svc.full_name == "pipeserve.v1.ModelService":
        return svc.methods_by_name["GetModelStatistics"]
    unary = [m for m in svc.methods if not m.client_streaming and not m.server_streaming]
    return unary[0] if unary else None


def statistics(channel: grpc.Channel) -> list[ms_pb.ModelStatistics]:
    return list(ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(), timeout=10).models)


def assert_no_slots_held(channel: grpc.Channel) -> None:
    """Every model's in-flight and queued counts are back to zero (all calls here have returned)."""
    held = [(m.name, m.version, m.in_flight, m.queued) for m in statistics(channel) if m.in_flight or m.queued]
    assert not held, f"slots still held after every call returned: {held}"


def assert_still_serving(channel: grpc.Channel, service_name: str) -> None:
    assert_no_slots_held(channel)
    method = inference_method(service(service_name))
    if method is None:
        return
    code, details, _ = invoke(channel, method, normal_request(method))
    assert code == grpc.StatusCode.OK, f"{method.full_name}: a normal request after bad ones got {code}: {details}"


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(target):
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(target, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def served_names(server) -> list[str]:
    return sorted(server.server.registry.served)


def steer(served: list[str]):
    """Field overrides that make random requests reach task code more often than NOT_FOUND."""
    def strings(*choices):
        return lambda field: st.sampled_from(list(choices)) if field.type == FieldDescriptor.TYPE_STRING else None

    def inputs(field):
        if field.type == FieldDescriptor.TYPE_STRING:
            return st.lists(texts, max_size=4)
        if field.type == FieldDescriptor.TYPE_BYTES:
            return st.lists(images, max_size=3)
        return None

    return {
        "model": strings("", "", *served, "no-such-model", "../sentiment"),
        "model_name": strings(*served, "no-such-model", ""),
        "model_version": lambda f: (st.sampled_from([0, 0, 1, 2, -1, 2**62]) if f.type == FieldDescriptor.TYPE_INT64
                                    else st.sampled_from(["", "", "1", "0", "-1", "7", "latest", "1.5"])),
        "inputs": inputs,
        "input": lambda f: texts if f.type == FieldDescriptor.TYPE_STRING else None,
        "datatype": strings("BYTES", "BYTES", "FP32", "INT64", "INT32", "BOOL", "UINT8", "FP16", "BF16", "bogus", ""),
        "shape": lambda f: st.lists(st.sampled_from([-1, 0, 1, 1, 2, 3, 2**40]), max_size=3),
        "name": strings("TEXT", "TEXT_PAIR", "IMAGE", "QUESTION", "CONTEXT", "CANDIDATE_LABELS", "EMBEDDING", "LABEL", "x", ""),
        "raw_input_contents": lambda f: st.lists(st.binary(max_size=48), max_size=3),
    }


# -- the sweep -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service_name", SERVICE_NAMES)
def test_random_requests_get_a_clean_status(channel, served_names, service_name):
    svc = service(service_name)
    methods = [m for m in svc.methods if m.name not in MUTATING]
    overrides = steer(served_names)

    @FUZZ
    @given(data=st.data())
    def sweep(data):
        method = data.draw(st.sampled_from(methods), label="method")
        request = data.draw(messages(method.input_type, overrides), label="request")
        assert_clean(method, request, *invoke(channel, method, request))

    sweep()
    assert_still_serving(channel, service_name)


@pytest.mark.parametrize("service_name", SERVICE_NAMES)
def test_random_bytes_on_the_wire_get_a_clean_status(channel, service_name):
    methods = [m for m in service(service_name).methods if m.name not in MUTATING]

    @settings(FUZZ, max_examples=15)
    @given(method=st.sampled_from(methods), raw=st.binary(max_size=200))
    def sweep(method, raw):
        assert_clean(method, raw, *invoke(channel, method, raw))

    sweep()
    assert_still_serving(channel, service_name)


@pytest.mark.parametrize("service_name", SERVICE_NAMES)
def test_invalid_utf8_in_any_string_field_is_invalid_argument(channel, service_name):
    """A proto3 string must be UTF-8: every string field, nested ones too, gets bytes that are not,
    written on the wire by hand (no protobuf library will serialize them)."""
    placeholder, poison = b"PLACEHOLDER", b"\xffPLACEHOL\xfe\xc0"  # same length: length prefixes stay right
    for method in service(service_name).methods:
        cls = message_factory.GetMessageClass(method.input_type)
        paths = string_field_paths(method.input_type)
        for path in paths:
            raw = with_string(cls(), path, placeholder.decode()).SerializeToString()
            code, details, _ = invoke(channel, method, raw.replace(placeholder, poison))
            where = f"{method.full_name} {'.'.join(path)}"
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {code}: {details}"
            assert f"is not a valid {method.input_type.full_name} message" in details, f"{where}: {details}"
        if paths:
            # A message cut short in the middle of a field fails the same way.
            raw = with_string(cls(), paths[0], "truncated").SerializeToString()[:-3]
            code, details, _ = invoke(channel, method, raw)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method.full_name} truncated: {code}: {details}"
    assert_still_serving(channel, service_name)


# -- named cases -------------------------------------------------------------------------------------------------


def _text_services() -> list[str]:
    found = []
    for name in SERVICE_NAMES:
        method = inference_method(service(name))
        fields = method.input_type.fields_by_name if method is not None else {}
        if "inputs" in fields and fields["inputs"].type == FieldDescriptor.TYPE_STRING:
            found.append(name)
    return found


@pytest.mark.parametrize("service_name", _text_services())
def test_empty_huge_and_too_many_inputs(channel, service_name):
    method = inference_method(service(service_name))

    def request(inputs: list[str]) -> Message:
        r = normal_request(method)
        del r.inputs[:]
        r.inputs.extend(inputs)
        return r

    code, details, _ = invoke(channel, method, request([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("inputs:"), details
    # A quarter megabyte of text: cut to the model's length (the default truncation), or refused by name.
    code, details, _ = invoke(channel, method, request(["lorem ipsum dolor sit amet " * 10_000]))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details
    if code != grpc.StatusCode.OK:
        assert details.startswith("inputs"), details
    code, details, _ = invoke(channel, method, request(["x"] * (MAX_INPUTS_PER_REQUEST + 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {MAX_INPUTS_PER_REQUEST}" in details, details
    assert_still_serving(channel, service_name)


def _request(service_name: str, **fields) -> tuple[MethodDescriptor, Message]:
    method = inference_method(service(service_name))
    request = normal_request(method)
    for key, value in fields.items():
        setattr(request, key, value)
    return method, request


@pytest.mark.parametrize("service_name", [n for n in SERVICE_NAMES if n.startswith("pipeserve.v1.") and n != "pipeserve.v1.ModelService"])
def test_unknown_model_and_version_are_not_found(channel, service_name):
    method, request = _request(service_name, model="no-such-model")
    code, details, _ = invoke(channel, method, request)
    assert code == grpc.StatusCode.NOT_FOUND and "'no-such-model' is not served" in details, details
    method, request = _request(service_name, model=_default_model(channel, method, service_name), model_version=99)
    code, details, _ = invoke(channel, method, request)
    assert code == grpc.StatusCode.NOT_FOUND and "no version 99" in details, details


def _default_model(channel: grpc.Channel, method: MethodDescriptor, service_name: str) -> str:
    code, details, responses = invoke(channel, method, normal_request(method))
    assert code == grpc.StatusCode.OK, f"{service_name}: {details}"
    return responses[0].model


NEGATIVE_PARAMETERS = [
    ("pipeserve.v1.TextClassificationService", {"top_k": -1}, "top_k"),
    ("pipeserve.v1.TokenClassificationService", {"aggregation_strategy": 99}, "aggregation_strategy"),
    ("pipeserve.v1.QuestionAnsweringService", {"top_k": 0}, "top_k"),
    ("pipeserve.v1.QuestionAnsweringService", {"doc_stride": -1}, "doc_stride"),
    ("pipeserve.v1.QuestionAnsweringService", {"max_answer_len": -5}, "max_answer_len"),
    ("pipeserve.v1.QuestionAnsweringService", {"max_seq_len": -2_000_000_000}, "max_seq_len"),
    ("pipeserve.v1.FillMaskService", {"top_k": -1}, "top_k"),
    ("pipeserve.v1.ImageClassificationService", {"top_k": -1}, "top_k"),
    ("pipeserve.v1.FeatureExtractionService", {"pooling": 42}, "pooling"),
]


@pytest.mark.parametrize("service_name, fields, field", NEGATIVE_PARAMETERS,
                         ids=[f"{s.rsplit('.', 1)[-1]}-{f}" for s, _, f in NEGATIVE_PARAMETERS])
def test_negative_and_out_of_range_parameters_name_the_field(channel, service_name, fields, field):
    if service_name not in SERVICE_NAMES:
        pytest.skip(f"{service_name} is not served")
    method, request = _request(service_name, **fields)
    code, details, _ = invoke(channel, method, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}:"), details


KSERVE_PARAMETERS = [
    ("top_k", {"double_param": math.nan}), ("top_k", {"double_param": math.inf}), ("top_k", {"int64_param": -1}),
    ("priority", {"int64_param": -1}), ("timeout", {"int64_param": -5}), ("function_to_apply", {"string_param": "nan"}),
]


@pytest.mark.parametrize("key, value", KSERVE_PARAMETERS, ids=[f"{k}-{next(iter(v.values()))}" for k, v in KSERVE_PARAMETERS])
def test_kserve_nan_and_negative_parameters_name_the_parameter(channel, key, value):
    method = service("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
    request = normal_request(method)
    for kind, number in value.items():
        setattr(request.parameters[key], kind, number)
    code, details, _ = invoke(channel, method, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and key in details, details


@pytest.mark.parametrize("kind", sorted(MALFORMED_IMAGES))
def test_malformed_images_name_the_input(channel, kind):
    method, request = _request("pipeserve.v1.ImageClassificationService")
    request.inputs.append(MALFORMED_IMAGES[kind])  # after a good image: the error names index 1
    code, details, _ = invoke(channel, method, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("inputs[1]:"), details


def test_image_checks_leave_the_server_serving(channel):
    assert_still_serving(channel, "pipeserve.v1.ImageClassificationService")


# -- KServe v2: tensor shapes and contents -----------------------------------------------------------------------


def _bytes_raw(items: list[bytes]) -> bytes:
    """BYTES tensors on the wire: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


@FUZZ
@given(data=st.data())
def test_kserve_wrong_shapes_and_contents_are_invalid_argument(channel, served_names, data):
    """The declared shape and the data sent must agree, element for element; any mismatch is
    INVALID_ARGUMENT naming the tensor, never a crash or a wrong answer."""
    from tritonclient.grpc import service_pb2 as v2

    model = data.draw(st.sampled_from([m for m in ("sentiment", "minilm", "vit", "qa") if m in served_names]))
    name = {"vit": "IMAGE", "qa": "QUESTION"}.get(model, "TEXT")
    shape = data.draw(st.lists(st.integers(-2, 4), min_size=0, max_size=3), label="shape")
    count = data.draw(st.integers(0, 5), label="elements sent")
    items = [GOOD_PNG if name == "IMAGE" else b"some text"] * count
    tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=shape)
    request = v2.ModelInferRequest(model_name=model)
    use_raw = data.draw(st.booleans(), label="raw")
    if use_raw:
        raw = _bytes_raw(items)
        cut = data.draw(st.integers(0, 3), label="bytes cut off the raw contents")
        request.raw_input_contents.append(raw[: len(raw) - cut] if cut else raw)
        declared_right = cut == 0
    else:
        tensor.contents.bytes_contents.extend(items)
        declared_right = True
    request.inputs.append(tensor)
    if model == "qa":
        # v2 takes raw contents for every input or for none: the context goes the question's way.
        context = v2.ModelInferRequest.InferInputTensor(name="CONTEXT", datatype="BYTES", shape=shape)
        if use_raw:
            request.raw_input_contents.append(_bytes_raw([b"the cat sits"] * count))
        else:
            context.contents.bytes_contents.extend([b"the cat sits"] * count)
        request.inputs.append(context)
    method = service("inference.GRPCInferenceService").methods_by_name["ModelInfer"]
    code, details, _ = invoke(channel, method, request)
    assert_clean(method, request, code, details, [])
    elements = math.prod(shape) if shape and min(shape) >= 0 else -1
    if not declared_right or elements != count or len(shape) != 1 or count == 0:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"shape {shape} with {count} elements -> {code}: {details}"
    else:
        assert code == grpc.StatusCode.OK, f"shape {shape} with {count} elements -> {code}: {details}"


def test_kserve_checks_leave_the_server_serving(channel):
    assert_still_serving(channel, "inference.GRPCInferenceService")


# -- message size limits -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limits(model_repository):
    settings_ = server_settings(model_repository, load_models=["sentiment", "minilm"],
                                max_receive_message_bytes=64 << 10, max_send_message_bytes=64 << 10)
    running = ServerThread(settings_).start()
    yield running
    running.stop()


def test_messages_over_the_size_limits_are_resource_exhausted(small_limits):
    from pipeserve.v1 import feature_extraction_pb2 as fe_pb
    from pipeserve.v1 import feature_extraction_pb2_grpc as fe_grpc
    from pipeserve.v1 import text_classification_pb2 as tc_pb
    from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc

    with grpc.insecure_channel(small_limits.target) as ch:
        classify = tc_grpc.TextClassificationServiceStub(ch).Classify
        with pytest.raises(grpc.RpcError) as info:
            classify(tc_pb.ClassifyRequest(inputs=["x" * (100 << 10)]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Received message larger than max" in info.value.details()
        # A reply over the send limit: token-level embeddings of a long text (256 x 384 floats).
        with pytest.raises(grpc.RpcError) as info:
            fe_grpc.FeatureExtractionServiceStub(ch).Embed(fe_pb.EmbedRequest(inputs=["word " * 300]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Sent message larger than max" in info.value.details()
        assert classify(tc_pb.ClassifyRequest(inputs=["a normal request"]), timeout=30).results
        assert_no_slots_held(ch)
