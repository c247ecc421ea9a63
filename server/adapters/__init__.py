"""Protocol adapters: the only layer that sees protobuf messages and gRPC status codes.

`services()` lists every gRPC service the server exposes; adding a protocol or a task service
means adding its line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeserve.server.dataplane import DataPlane
from pipeserve.server.model_registry import ModelRegistry


@dataclass(frozen=True)
class Service:
    full_name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]


def services(plane: DataPlane, registry: ModelRegistry) -> list[Service]:
    from pipeserve.server.adapters.feature_extraction import FeatureExtractionServicer
    from pipeserve.server.adapters.model_service import ModelServicer
    from pipeserve.server.adapters.text_classification import TextClassificationServicer
    from pipeserve.v1 import feature_extraction_pb2_grpc, model_service_pb2_grpc, text_classification_pb2_grpc

    return [
        Service("pipeserve.v1.TextClassificationService", TextClassificationServicer(plane),
                text_classification_pb2_grpc.add_TextClassificationServiceServicer_to_server),
        Service("pipeserve.v1.FeatureExtractionService", FeatureExtractionServicer(plane),
                feature_extraction_pb2_grpc.add_FeatureExtractionServiceServicer_to_server),
        Service("pipeserve.v1.ModelService", ModelServicer(plane),
                model_service_pb2_grpc.add_ModelServiceServicer_to_server),
    ]
