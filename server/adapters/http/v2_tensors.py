"""KServe v2 REST bodies ⇄ kserve_inference's requests and responses: JSON tensors and Triton's
binary tensor extension.

An inference body is a JSON object, optionally followed by binary tensor data: then the
`Inference-Header-Content-Length` header gives the JSON's length, and each binary input says its
size in `parameters.binary_data_size`, in input order. Binary data has the raw layout of gRPC's
raw_input_contents (kserve_tensors.decode_raw). Outputs come as JSON `data`, or binary where the
output's `parameters.binary_data` (or the request's `binary_data_output`) asks for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from pipeserve.server.adapters.http.errors import HttpError, json_object, parse_json
from pipeserve.server.adapters.kserve_inference import (
    FINAL_RESPONSE,
    InputTensor,
    RequestedOutput,
    V2Request,
    V2Response,
)
from pipeserve.server.adapters.kserve_tensors import DATATYPES, check_shape, decode_raw, raw_bytes, reshaped
from pipeserve.server.errors import InvalidArgument, Unimplemented

HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"

_REQUEST_FIELDS = ("id", "parameters", "inputs", "outputs")
_INPUT_FIELDS = ("name", "datatype", "shape", "data", "parameters")
_OUTPUT_FIELDS = ("name", "parameters")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class RestInferRequest:
    request: V2Request
    # Output name -> binary or JSON; `binary_default` for the outputs not named.
    binary: dict[str, bool]
    binary_default: bool


def parse_infer_request(body: bytes, header_length: str | None, model_name: str, model_version: str) -> RestInferRequest:
    """An inference request from its body (JSON, or JSON then binary tensors)."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise HttpError(400, f"Inference-Header-Content-Length must be a byte count, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise HttpError(400, f"Inference-Header-Content-Length is {length} but the body holds {len(body)} bytes")
        header, binary = body[:length], body[length:]
    doc = json_object(parse_json(header, "the inference request's JSON"), "body", _REQUEST_FIELDS)
    parameters = _parameters(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidArgument("inputs", "must be a list of tensors {name, datatype, shape, data}")
    inputs, offset = [], 0
    for i, item in enumerate(raw_inputs):
        tensor, offset = _input(i, item, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidArgument("binary data", f"the body holds {len(binary) - offset} bytes after the inputs' binary "
                              "data; each binary input must give its binary_data_size")
    outputs, binary_flags = [], {}
    raw_outputs = doc.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InvalidArgument("outputs", "must be a list of {name, parameters}")
    for i, item in enumerate(raw_outputs):
        item = json_object(item, f"outputs[{i}]", _OUTPUT_FIELDS)
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"outputs[{i}].name", "must be a string")
        params = _parameters(item.get("parameters"), f"outputs[{i}].parameters")
        if any(key in params for key in _SHARED_MEMORY):
            raise Unimplemented("shared memory is not supported; receive tensors in the response")
        if "binary_data" in params:
            binary_flags[name] = _bool(params.pop("binary_data"), f"outputs[{i}].parameters.binary_data")
        outputs.append(RequestedOutput(name, params))
    binary_default = _bool(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("id", "must be a string")
    request = V2Request(model_name, model_version, inputs, parameters, outputs, request_id)
    return RestInferRequest(request, binary_flags, binary_default)


def _input(i: int, item: Any, binary: bytes, offset: int) -> tuple[InputTensor, int]:
    item = json_object(item, f"inputs[{i}]", _INPUT_FIELDS)
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str):
        raise InvalidArgument(f"inputs[{i}].name", "must be a string")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input {name}", "needs a datatype (BYTES, FP32, INT64, ...)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"input {name}", f"shape must be a list of integers, got {shape!r}")
    params = _parameters(item.get("parameters"), f"input {name}.parameters")
    if any(key in params for key in _SHARED_MEMORY):
        raise Unimplemented("shared memory is not supported; send tensors in the request")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in item:
            raise InvalidArgument(f"input {name}", "carries both data and binary_data_size; send one")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"input {name}", f"binary_data_size must be a byte count, got {size!r}")
        if offset + size > len(binary):
            raise InvalidArgument(f"input {name}", f"binary_data_size is {size} but only {len(binary) - offset} "
                                  "bytes of binary data are left in the body")
        raw = binary[offset:offset + size]
        return InputTensor(name, datatype, tuple(shape),
                           lambda: decode_raw(name, datatype, check_shape(name, datatype, shape), raw)), offset + size
    if "data" not in item:
        raise InvalidArgument(f"input {name}", "has neither data nor parameters.binary_data_size")
    data = item["data"]
    return InputTensor(name, datatype, tuple(shape), lambda: _json_tensor(name, datatype, shape, data)), offset


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    shape = check_shape(name, datatype, shape)
    flat = list(_flatten(data))
    dtype, _ = DATATYPES[datatype]
    if datatype == "BYTES":
        for j, value in enumerate(flat):
            if not isinstance(value, str):
                raise InvalidArgument(f"input {name}[{j}]", f"must be a string (BYTES in JSON), got {value!r}")
        array = np.empty(len(flat), dtype=object)
        array[:] = [v.encode("utf-8", "surrogatepass") for v in flat]
        return reshaped(name, array, shape)
    if datatype.startswith(("FP", "INT", "UINT")):
        bad = next((v for v in flat if not isinstance(v, (int, float)) or isinstance(v, bool)), None)
    else:  # BOOL
        bad = next((v for v in flat if not isinstance(v, bool)), None)
    if bad is not None:
        raise InvalidArgument(f"input {name}", f"{datatype} data must be {'booleans' if datatype == 'BOOL' else 'numbers'}, "
                              f"got {bad!r}")
    try:
        array = np.array(flat, dtype=dtype)
    except OverflowError:
        raise InvalidArgument(f"input {name}", f"a value does not fit {datatype}") from None
    if datatype.startswith(("INT", "UINT")) and any(isinstance(v, float) and not float(v).is_integer() for v in flat):
        raise InvalidArgument(f"input {name}", f"{datatype} data must be integers")
    return reshaped(name, array, shape)


def _flatten(data: Any):
    """A tensor's JSON data, flat or nested as its shape (row-major), as a flat sequence."""
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    params = json_object(value, what)
    for key, item in params.items():
        if not isinstance(item, (str, int, float, bool)):
            raise InvalidArgument(f"{what}.{key}", f"must be a string, number or boolean, got {type(item).__name__}")
    return dict(params)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(what, f"must be true or false, got {value!r}")
    return value


# -- responses -------------------------------------------------------------------------------------


def infer_response_body(response: V2Response, binary: dict[str, bool], binary_default: bool) -> tuple[bytes, int | None]:
    """(body, JSON length when binary outputs follow it, else None)."""
    outputs, blobs = [], []
    for spec, array in response.outputs:
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if binary.get(spec.name, binary_default):
            blob = raw_bytes(spec.datatype, array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_data(spec.datatype, array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    if response.final is not None:
        doc["parameters"] = {FINAL_RESPONSE: response.final}
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def json_data(datatype: str, array: np.ndarray) -> list[Any]:
    """A tensor's values as a flat JSON list (row-major). BYTES as text; NaN and infinities, which
    JSON cannot write, as null (tritonclient reads null back as NaN)."""
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    values = flat.tolist()
    if datatype.startswith(("FP", "BF")):
        return [v if math.isfinite(v) else None for v in values]
    return values


# -- Triton's JSON of its protobuf messages (model config, statistics) ------------------------------------

_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def proto_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP endpoints write it: protobuf's JSON mapping with the proto field
    names and every field, except that 64-bit integers are numbers (protobuf writes them as strings)."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _int64_numbers(doc, message.DESCRIPTOR)


def _int64_numbers(doc: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            doc[field.name] = {k: _field_value(v, value_field) for k, v in value.items()}
        elif _is_repeated(field):
            doc[field.name] = [_field_value(v, field) for v in value]
        else:
            doc[field.name] = _field_value(value, field)
    return doc


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return repeated if isinstance(repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED


def _field_value(value: Any, field: FieldDescriptor) -> Any:
    if field.message_type is not None and isinstance(value, dict):
        return _int64_numbers(value, field.message_type)
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    return value


def tensor_metadata(specs: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]
