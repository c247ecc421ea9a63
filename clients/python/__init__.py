"""pipeserve's Python SDK: transformers' `pipeline()`, served remotely over gRPC."""

from pipeserve.client import aio
from pipeserve.client.channel import ConnectionOptions
from pipeserve.client.pipeline import RemotePipeline, pipeline

__all__ = ["ConnectionOptions", "RemotePipeline", "aio", "pipeline"]
