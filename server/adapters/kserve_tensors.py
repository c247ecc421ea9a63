"""KServe v2 wire tensors and parameters ⇄ numpy arrays and Python values.

The v2 protocol carries a tensor either in typed `contents` fields or as bytes in the request's
`raw_input_contents` (what tritonclient sends). BYTES elements travel as a 4-byte little-endian
length followed by the bytes; every other datatype as its little-endian values, row-major.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as v2

from pipeserve.server.errors import InvalidArgument

# v2 datatype -> (numpy dtype, InferTensorContents field); FP16 and BF16 travel only as raw bytes.
DATATYPES: dict[str, tuple[Any, str | None]] = {
    "BOOL": (np.dtype(np.bool_), "bool_contents"),
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "BYTES": (np.dtype(object), "bytes_contents"),
}

_LENGTH = struct.Struct("<I")


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _field(name: str) -> str:
    return f"input {name}"


def decode_tensor(tensor: v2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One request tensor as a numpy array of its shape (BYTES: an object array of bytes)."""
    field = _field(tensor.name)
    shape = check_shape(tensor.name, tensor.datatype, tensor.shape)
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(field, "carries both contents and raw_input_contents; send one")
        return decode_raw(tensor.name, tensor.datatype, shape, raw)
    dtype, contents_field = DATATYPES[tensor.datatype]
    if contents_field is None:
        raise InvalidArgument(field, f"{tensor.datatype} travels only in raw_input_contents")
    values = getattr(tensor.contents, contents_field)
    flat = np.array(list(values), dtype=dtype) if tensor.datatype == "BYTES" else np.asarray(values, dtype=dtype)
    return reshaped(tensor.name, flat, shape)


def check_shape(name: str, datatype: str, shape: Sequence[int]) -> list[int]:
    """The declared shape of a request tensor, once its datatype is known and no dimension negative."""
    field = _field(name)
    if datatype not in DATATYPES:
        raise InvalidArgument(field, f"datatype {datatype!r} is unknown; v2 datatypes: {', '.join(DATATYPES)}")
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(field, f"shape {shape} has a negative dimension")
    return shape


def decode_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A tensor from its raw bytes, as gRPC's raw_input_contents and HTTP's binary tensors carry
    it (BYTES: 4-byte little-endian lengths, each followed by its bytes; others: little-endian values)."""
    field = _field(name)
    if datatype == "BYTES":
        flat = _split_bytes(raw, field)
    else:
        dtype, _ = DATATYPES[datatype]
        needed = element_count(shape) * dtype.itemsize
        if len(raw) != needed:
            raise InvalidArgument(field, f"raw contents hold {len(raw)} bytes; shape {shape} of {datatype} needs {needed}")
        flat = np.frombuffer(raw, dtype=dtype)
    return reshaped(name, flat, shape)


def reshaped(name: str, flat: np.ndarray, shape: list[int]) -> np.ndarray:
    count = element_count(shape)
    if len(flat) != count:
        raise InvalidArgument(_field(name), f"holds {len(flat)} elements but its shape {shape} needs {count}")
    return flat.reshape(shape)


def _split_bytes(raw: bytes, field: str) -> np.ndarray:
    items: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if offset + 4 > end:
            raise InvalidArgument(field, "BYTES raw contents end inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidArgument(field, "a BYTES element's length runs past the end of the raw contents")
        items.append(raw[offset : offset + length])
        offset += length
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def encode_tensor(name: str, datatype: str, array: np.ndarray) -> tuple[v2.ModelInferResponse.InferOutputTensor, bytes]:
    """A response tensor and its raw bytes (responses always use raw_output_contents, as Triton does)."""
    meta = v2.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    return meta, raw_bytes(datatype, array)


def raw_bytes(datatype: str, array: np.ndarray) -> bytes:
    """An array as raw tensor bytes (the layout `decode_raw` reads)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    dtype, _ = DATATYPES[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def utf8_strings(array: np.ndarray, name: str) -> list[str]:
    """A BYTES tensor's elements as text; an element that is not UTF-8 is INVALID_ARGUMENT."""
    texts = []
    for i, item in enumerate(array.reshape(-1)):
        try:
            texts.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"input {name}[{i}]", f"is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return texts


def parameter_value(param: v2.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def infer_parameter(value: Any) -> v2.InferParameter:
    if isinstance(value, bool):
        return v2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return v2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return v2.InferParameter(double_param=value)
    return v2.InferParameter(string_param=str(value))
