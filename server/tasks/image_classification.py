"""image-classification: encoded image files through the model's image processor, labels out.

Inputs are the bytes of an image file (PNG, JPEG, WebP, GIF, BMP, TIFF: whatever Pillow reads);
the server never fetches URLs. Like transformers' `load_image`, the image is turned upright by
its EXIF orientation and converted to RGB before the model's image processor (loaded with
AutoImageProcessor) resizes and normalises it. Scores and top_k follow transformers'
ImageClassificationPipeline.

Untrusted images are checked before they are decoded: at most `max_image_bytes` bytes and
`max_image_pixels` pixels (from the header, so a decompression bomb is refused unread); both
limits can be set per model in config.pbtxt `parameters.defaults`.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import Task, TaskParams, check_int
from pipeserve.server.tasks.class_labels import class_labels, default_score_function
from pipeserve.server.tasks.text_classification import (
    checked_function_to_apply,
    rank_labels,
)

DEFAULT_TOP_K = 5
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000


@dataclass(frozen=True)
class ImageClassificationPost:
    function: str  # softmax | sigmoid | none
    top_k: int


class ImageClassificationTask(Task):
    name = "image-classification"
    model_class = "AutoModelForImageClassification"
    input_names = ("pixel_values",)
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(context.source, **context.pretrained_kwargs)
        self.labels = class_labels(context)
        self.default_function = default_score_function(context.hf_config, len(self.labels))
        defaults = self.defaults()
        self.max_image_bytes = check_int("parameters.defaults.max_image_bytes",
                                         defaults.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES), 1)
        self.max_image_pixels = check_int("parameters.defaults.max_image_pixels",
                                          defaults.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS), 1)

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        function = checked_function_to_apply(params, self.default_function)
        # 0 gives no labels, as transformers' slice does; more than the model has gives them all.
        top_k = check_int("top_k", params.get("top_k", DEFAULT_TOP_K), 0)
        return TaskParams(post=ImageClassificationPost(function, min(top_k, len(self.labels))))

    def size(self, item: Any) -> int:
        return 1  # every image becomes the processor's fixed size

    def check_input(self, index: int, item: Any) -> None:
        """Type, byte size, a readable header and the pixel count; the full decode comes later."""
        field = f"inputs[{index}]"
        if not isinstance(item, (bytes, bytearray)):
            raise InvalidArgument(field, "must be the bytes of an image file")
        if not item:
            raise InvalidArgument(field, "is empty; send the bytes of an image file")
        if len(item) > self.max_image_bytes:
            raise InvalidArgument(field, f"has {len(item)} bytes; at most {self.max_image_bytes}")
        with _open(field, item) as image:
            width, height = image.size
            if width * height > self.max_image_pixels:
                raise InvalidArgument(field, f"is {width}x{height} = {width * height} pixels; at most {self.max_image_pixels}")

    def preprocess(self, inputs: Sequence[bytes], pre: Hashable) -> Any:
        # "input": the server relabels it with the input's index in the client's request.
        images = [decode_image("input", data) for data in inputs]
        return dict(self.processor(images=images, return_tensors="pt"))

    def postprocess(self, inputs, features, outputs, posts: Sequence[ImageClassificationPost]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        return [rank_labels(row, self.labels, post.function, post.top_k) for row, post in zip(logits, posts)]


def _open(field: str, data: bytes | bytearray) -> Any:
    """Pillow's lazy open: reads the header only."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(field, f"is too large: {exc}") from None
    except Exception as exc:  # Pillow's plugins raise many kinds on hostile data; all mean "bad image"
        raise InvalidArgument(field, f"is not an image Pillow can read ({type(exc).__name__}: {exc})") from None


def decode_image(field: str, data: bytes) -> Any:
    """The upright RGB image, as transformers' load_image makes it; corrupt data is InvalidArgument."""
    from PIL import ImageOps

    image = _open(field, data)
    try:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:  # truncated or corrupt data, whatever the plugin raises
        raise InvalidArgument(field, f"could not be decoded ({type(exc).__name__}: {exc})") from None
