"""Protocol adapters: the only layer that sees protobuf messages and gRPC status codes.

`services()` lists every gRPC service the server exposes; adding a protocol or a task service
means adding its line here. Inference goes through the DataPlane, model management through the
ControlPlane; an adapter only translates messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane


@dataclass(frozen=True)
class Service:
    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]


def pipeserve_service(name: str, servicer: Any, grpc_module: Any) -> Service:
    """pipeserve.v1.`name`, registered by its generated module's add_<name>Servicer_to_server."""
    return Service(f"pipeserve.v1.{name}", servicer, getattr(grpc_module, f"add_{name}Servicer_to_server"))


def services(plane: DataPlane, control: ControlPlane) -> list[Service]:
    from pipeserve.server.adapters.feature_extraction import FeatureExtractionServicer
    from pipeserve.server.adapters.model_service import ModelServicer
    from pipeserve.server.adapters.text_classification import TextClassificationServicer
    from pipeserve.v1 import feature_extraction_pb2_grpc, model_service_pb2_grpc, text_classification_pb2_grpc

    return [
        pipeserve_service("TextClassificationService", TextClassificationServicer(plane), text_classification_pb2_grpc),
        pipeserve_service("FeatureExtractionService", FeatureExtractionServicer(plane), feature_extraction_pb2_grpc),
        *_encoder_task_services(plane),
        *_generation_services(plane),
        pipeserve_service("ModelService", ModelServicer(plane, control), model_service_pb2_grpc),
        _kserve_service(plane, control),
    ]


def _generation_services(plane: DataPlane) -> list[Service]:
    """text-generation (unary and streaming), summarization and translation."""
    from pipeserve.server.adapters.summarization import SummarizationServicer
    from pipeserve.server.adapters.text_generation import TextGenerationServicer
    from pipeserve.server.adapters.translation import TranslationServicer
    from pipeserve.v1 import summarization_pb2_grpc, text_generation_pb2_grpc, translation_pb2_grpc

    return [
        pipeserve_service("TextGenerationService", TextGenerationServicer(plane), text_generation_pb2_grpc),
        pipeserve_service("SummarizationService", SummarizationServicer(plane), summarization_pb2_grpc),
        pipeserve_service("TranslationService", TranslationServicer(plane), translation_pb2_grpc),
    ]


def _kserve_service(plane: DataPlane, control: ControlPlane) -> Service:
    """inference.GRPCInferenceService (KServe v2 / Triton), from the modules tritonclient ships."""
    from tritonclient.grpc import service_pb2_grpc

    from pipeserve.server.adapters.kserve import KServeServicer

    return Service("inference.GRPCInferenceService", KServeServicer(plane, control),
                   service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server)


def _encoder_task_services(plane: DataPlane) -> list[Service]:
    """token-classification, question-answering, fill-mask, zero-shot and image classification."""
    from pipeserve.server.adapters.fill_mask import FillMaskServicer
    from pipeserve.server.adapters.image_classification import ImageClassificationServicer
    from pipeserve.server.adapters.question_answering import QuestionAnsweringServicer
    from pipeserve.server.adapters.token_classification import TokenClassificationServicer
    from pipeserve.server.adapters.zero_shot_classification import ZeroShotClassificationServicer
    from pipeserve.v1 import (
        fill_mask_pb2_grpc,
        image_classification_pb2_grpc,
        question_answering_pb2_grpc,
        token_classification_pb2_grpc,
        zero_shot_classification_pb2_grpc,
    )

    return [
        pipeserve_service("TokenClassificationService", TokenClassificationServicer(plane),
                          token_classification_pb2_grpc),
        pipeserve_service("QuestionAnsweringService", QuestionAnsweringServicer(plane), question_answering_pb2_grpc),
        pipeserve_service("FillMaskService", FillMaskServicer(plane), fill_mask_pb2_grpc),
        pipeserve_service("ZeroShotClassificationService", ZeroShotClassificationServicer(plane),
                          zero_shot_classification_pb2_grpc),
        pipeserve_service("ImageClassificationService", ImageClassificationServicer(plane),
                          image_classification_pb2_grpc),
    ]
