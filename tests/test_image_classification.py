"""image-classification over the wire equals transformers' pipeline on the same ViT model."""

from __future__ import annotations

import concurrent.futures
import io

import grpc
import numpy as np
import pytest
from PIL import Image
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import image_classification_pb2 as pb
from pipeserve.v1 import image_classification_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (17, 90), dtype=np.uint8), "L")
    palette = rgb.resize((100, 100)).convert("P")
    return [rgb, rgba, gray, palette]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


IMAGES = _images()


@pytest.fixture(scope="module")
def reference(model_repository):
    return hf_pipeline("image-classification", model=str(model_repository / "vit"))


@pytest.fixture(scope="module")
def classify(target):
    with pipeline("image-classification", target=target) as remote:
        yield remote


def test_pil_images_match_transformers(classify, reference):
    result = classify(IMAGES[0])
    assert_same_results(result, reference(IMAGES[0]))
    assert sorted(d["label"] for d in result) == ["bird", "cat", "dog"]
    assert_same_results(classify(IMAGES), reference(IMAGES))
    assert_same_results(classify(IMAGES[:1]), reference(IMAGES[:1]))


@pytest.mark.parametrize("fmt,options", [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"quality": 80}),
                                         ("GIF", {}), ("BMP", {}), ("TIFF", {})])
def test_encoded_bytes_and_files_match_transformers_on_the_decoded_image(classify, reference, tmp_path, fmt, options):
    data = _encode(IMAGES[0], fmt, **options)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    expected = reference(str(path))  # transformers decodes the file itself
    assert_same_results(classify(data), expected)
    assert_same_results(classify(str(path)), expected)


def test_exif_orientation_is_applied(classify, reference, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    IMAGES[1].convert("RGB").save(path, exif=exif)
    assert_same_results(classify(path.read_bytes()), reference(str(path)))
    assert_same_results(classify(Image.open(path)), reference(Image.open(path)))


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_k": 2}, {"top_k": 10}, {"function_to_apply": "sigmoid"},
                                    {"function_to_apply": "none", "top_k": 3}, {"top_k": 0}, {"top_k": None},
                                    {"function_to_apply": "SOFTMAX"}, {"timeout": 30.0}])
def test_parameters(classify, reference, params):
    assert_same_results(classify(IMAGES, **params), reference(IMAGES, **params))


def test_concurrent_requests_batch_without_changing_results(classify):
    alone = [classify(image) for image in IMAGES]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: classify(IMAGES[i % len(IMAGES)]), range(6 * len(IMAGES))))
    for i, result in enumerate(together):
        assert_same_results(result, alone[i % len(IMAGES)])


def test_the_sdk_never_fetches_urls(classify):
    with pytest.raises(ValueError, match="URL"):
        classify("https://example.com/cat.png")


def test_corrupt_empty_oversize_images_and_bad_parameters_are_invalid_argument(target):
    png = _encode(IMAGES[0], "PNG")
    # 48 million pixels (above the 40 million limit) in a few kilobytes: refused from the header.
    huge = _encode(Image.new("1", (8000, 6000)), "PNG")
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ImageClassificationServiceStub(channel)

        def classify(**fields):
            return lambda: stub.ClassifyImage(pb.ClassifyImageRequest(**fields))

        expect_invalid_argument(classify(inputs=[png, b"this is not an image"]), "inputs[1]")
        expect_invalid_argument(classify(inputs=[b""]), "inputs[0]")
        assert "pixels" in expect_invalid_argument(classify(inputs=[huge]), "inputs[0]")
        # A valid header with the pixel data cut short fails when decoded.
        assert "decoded" in expect_invalid_argument(classify(inputs=[png, png[: len(png) // 2]]), "inputs[1]")
        expect_invalid_argument(classify(inputs=[png], top_k=-1), "top_k")
        expect_invalid_argument(classify(inputs=[png], function_to_apply=42), "function_to_apply")
        expect_invalid_argument(classify(inputs=[]), "inputs")
        response = stub.ClassifyImage(pb.ClassifyImageRequest(inputs=[png, png]))
    assert response.model == "vit" and len(response.results) == 2


def test_images_keyword_and_arrays_of_this_process(classify, reference):
    assert_same_results(classify(images=IMAGES[:2]), reference(IMAGES[:2]))
    with pytest.raises(TypeError, match="cannot cross the wire"):
        classify(np.zeros((32, 32, 3), dtype=np.uint8))
