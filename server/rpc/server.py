"""The grpc.aio server: both services, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loracle.v1 import command_service_pb2, query_service_pb2
from loracle.v1 import command_service_pb2_grpc as cmd_grpc
from loracle.v1 import query_service_pb2_grpc as qry_grpc
from server.bootstrap import Container
from server.rpc.dispatch import Dispatcher
from server.rpc.servicers import CommandServicer, QueryServicer

log = logging.getLogger("loracle.server")

SERVICE_NAMES = (
    command_service_pb2.DESCRIPTOR.services_by_name["CommandService"].full_name,
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
)


class LoracleServer:
    def __init__(
        self,
        container: Container,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.container = container
        max_bytes = container.settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
            ]
        )
        dispatcher = Dispatcher(container.commands, container.queries)
        cmd_grpc.add_CommandServiceServicer_to_server(CommandServicer(dispatcher), self.server)
        qry_grpc.add_QueryServiceServicer_to_server(QueryServicer(dispatcher), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self, listen: str) -> int:
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("loracle serving on %s (port %d)", listen, self.port)
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops taking calls, lets running ones finish within `grace`, then closes stores."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.container.close()
        log.info("loracle stopped")

    async def serve_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received; shutting down gracefully")
        await self.stop(self.container.settings.shutdown_grace_seconds)
