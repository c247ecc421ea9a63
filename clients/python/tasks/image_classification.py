from __future__ import annotations

import io
import os
from typing import Any

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable, int_value
from pipeserve.v1 import image_classification_pb2 as pb
from pipeserve.v1 import image_classification_pb2_grpc as pb_grpc

_FUNCTIONS = {None: 0, "default": 0, "softmax": 1, "sigmoid": 2, "none": 3}

PARAMETERS = ParameterTable(
    served={
        "top_k": "labels per image, ranked (default 5; at most the model's labels; 0: none)",
        "function_to_apply": "softmax, sigmoid or none (transformers' ClassificationFunction too); unset: the model's",
        # RemotePipeline.__call__ takes `timeout` itself: it never reaches the codec.
        "timeout": "seconds: bounds the whole call (the SDK's deadline); the SDK never fetches URLs",
    },
).merged(CALL_OPTIONS)


def image_bytes(image: Any) -> bytes:
    """The bytes of an image file from bytes, a file path or a PIL.Image (sent as lossless PNG).

    The server never fetches URLs: download the image and pass its bytes.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise ValueError("the server does not fetch URLs; download the image and pass its bytes")
        with open(path, "rb") as f:
            return f.read()
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        from PIL import ImageOps

        # What transformers' load_image does to a PIL image, done here so that PNG keeps it exactly.
        upright = ImageOps.exif_transpose(image).convert("RGB")
        buffer = io.BytesIO()
        upright.save(buffer, format="PNG")
        return buffer.getvalue()
    if hasattr(image, "__array__") or hasattr(image, "__dlpack__"):
        raise TypeError(f"an image array ({type(image).__name__}) of this process cannot cross the wire; pass a "
                        "PIL.Image, a file path or the bytes of an image file")
    raise TypeError(f"an image must be bytes, a file path or a PIL.Image, not {type(image).__name__}")


class ImageClassificationCodec(TaskCodec):
    task = "image-classification"
    stub = pb_grpc.ImageClassificationServiceStub
    method = "ClassifyImage"

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if not args and "images" in params:  # transformers' older keyword
            params = dict(params)
            return params.pop("images"), params
        return super().call_arguments(args, params)

    parameters = PARAMETERS

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyImageRequest:
        params = PARAMETERS.check(self.task, params)
        if inputs is None:
            raise ValueError("Cannot call the image-classification pipeline without an inputs argument!")
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        # transformers' ClassificationFunction enum or its value
        function = getattr(params.get("function_to_apply"), "value", params.get("function_to_apply"))
        if isinstance(function, str):
            function = function.lower()
        if function not in _FUNCTIONS:
            raise ValueError(f"function_to_apply must be one of {[k for k in _FUNCTIONS if k]}, got {function!r}")
        request = pb.ClassifyImageRequest(model=self.model, inputs=[image_bytes(i) for i in items],
                                          function_to_apply=_FUNCTIONS[function])
        if params.get("top_k") is not None:
            request.top_k = int_value(self.task, "top_k", params["top_k"])
        return request

    def shape(self, response: pb.ClassifyImageResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = [[{"label": s.label, "score": s.score} for s in r.labels] for r in response.results]
        return outputs if isinstance(inputs, (list, tuple)) else outputs[0]
