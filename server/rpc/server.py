"""The grpc.aio server: both services, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loracle.v1 import command_service_pb2, query_service_pb2
from loracle.v1 import command_service_pb2_grpc as cmd_grpc
from loracle.v1 import query_service_pb2_grpc as qry_grpc
from server.bootstrap import Container
from server.config import Settings
from server.rpc import reflection
from server.rpc.dispatch import Dispatcher
from server.rpc.field_limits import limits
from server.rpc.servicers import CommandServicer, QueryServicer
from server.rpc.validation import RequestValidationInterceptor

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
            # Innermost, so the others (metrics) see its refusals like any status.
            interceptors=[
                *interceptors,
                RequestValidationInterceptor(
                    max_bytes,
                    limits(
                        container.settings.max_prompt_chars,
                        container.settings.max_loras_per_request,
                    ),
                ),
            ],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                *connection_options(container.settings),
            ],
        )
        dispatcher = Dispatcher(
            container.commands, container.queries, container.authenticator, container.tokens
        )
        cmd_grpc.add_CommandServiceServicer_to_server(CommandServicer(dispatcher), self.server)
        qry_grpc.add_QueryServiceServicer_to_server(QueryServicer(dispatcher), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.REFLECTION), self.server
        )
        self.port = 0

    async def start(self, listen: str) -> int:
        settings = self.container.settings
        check_exposure(listen, settings)
        credentials = server_credentials(settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(listen)
        else:
            self.port = self.server.add_secure_port(listen, credentials)
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


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """Pings find dead peers of long, quiet generation streams; a bounded connection age lets
    load balancers rebalance, and the long grace lets a running stream finish first. A peer
    that opens a connection and never completes the handshake is dropped after
    `handshake_timeout_seconds` (else idle raw sockets hold file descriptors forever)."""
    ms = 1000
    return [
        ("grpc.server_handshake_timeout_ms", int(settings.handshake_timeout_seconds * ms)),
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * ms)),
        ("grpc.keepalive_timeout_ms", 10 * ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5 * ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * ms)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * ms)),
    ]


class ExposureError(Exception):
    """Refusing to serve without authentication and TLS beyond this machine."""


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]").lower()
    if host in ("localhost", "::1"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (or 0.0.0.0-like wildcard) may reach other machines


def check_exposure(listen: str, settings: Settings) -> None:
    """Off loopback, a server without tokens and TLS would let anyone on the network write;
    that takes an explicit --insecure, and is logged loudly."""
    if is_loopback(listen):
        return
    missing = [
        what
        for what, present in (
            ("authentication ([[tokens]])", bool(settings.tokens)),
            ("TLS (--tls-cert/--tls-key)", settings.tls_cert is not None),
        )
        if not present
    ]
    if not missing:
        return
    if not settings.insecure:
        raise ExposureError(
            f"refusing to listen on {listen} without {' and '.join(missing)}; configure them, "
            "listen on 127.0.0.1, or pass --insecure"
        )
    log.warning(
        "INSECURE: serving on %s without %s; anyone who can reach this port can use it",
        listen,
        " and ".join(missing),
    )


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ExposureError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ExposureError("TLS needs both --tls-cert and --tls-key")
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ExposureError(f"cannot read TLS files: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
