"""grpc.health.v1 for the whole server, for each service, and for Kubernetes' probes.

Service names answered:
  ""           the server as a whole: SERVING once the models are loaded, until drain
  "liveness"   SERVING while the process runs (a liveness probe must not fail during drain)
  "readiness"  the same as "" (a readiness probe)
  each full service name (e.g. "pipeserve.v1.TextClassificationService")
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

LIVENESS = "liveness"
READINESS = "readiness"


class HealthReporter:
    def __init__(self, service_names: list[str]):
        self.servicer = health.aio.HealthServicer()
        self.service_names = list(service_names)

    async def starting(self) -> None:
        await self.servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def draining(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_all(self, status: int) -> None:
        for name in ["", READINESS, *self.service_names]:
            await self.servicer.set(name, status)
