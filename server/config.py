"""Settings from flags, environment (LORACLE_*) and a TOML file, in that order of precedence."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from server.domain.errors import FieldViolation, ValidationError
from server.domain.models import BaseModelConfig, resolve_architecture

SCOPES = ("read", "write", "generate", "admin")


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """A bearer token as configured: its SHA-256 (the token itself is never stored)."""

    name: str
    sha256: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("./data")
    # Empty: sqlite:///<data_dir>/loracle.db
    storage_url: str = ""
    # Empty: [<data_dir>/loras]
    lora_roots: tuple[Path, ...] = ()
    max_header_bytes: int = 16 * 1024 * 1024
    max_message_bytes: int = 64 * 1024 * 1024
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    rebuild_projections: bool = False
    # [[models]] tables; none configured means the embedded tiny placeholder model.
    models: tuple[BaseModelConfig, ...] = ()
    # Generation jobs that may wait; more are refused with RESOURCE_EXHAUSTED.
    max_queue: int = 16
    # Images run together in one batch, and how long the first job waits for companions.
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    # Device memory the resident pipelines may use (0: no limit); least recently used
    # models are unloaded to make room. LoRA adapters kept loaded per pipeline.
    device_budget_gb: float = 0.0
    adapter_budget_gb: float = 2.0
    # Finished images stay in <data_dir>/generations this long for WatchGeneration.
    image_retention_hours: float = 24.0
    # Torch CPU threads for the worker (1 keeps a busy 2-core machine responsive).
    torch_threads: int = 1
    # Build the placeholder when no model is configured (off: it is listed as not ready).
    embedded_model: bool = True
    # [[tokens]] tables (name, sha256, scopes). None configured: no authentication, which the
    # server accepts only on a loopback address unless `insecure` is set.
    tokens: tuple[TokenConfig, ...] = ()
    # TLS from PEM files; with tls_client_ca, clients must present a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Listen beyond loopback without auth and TLS anyway (logged loudly).
    insecure: bool = False
    # Limits on one generation request (INVALID_ARGUMENT beyond them).
    max_prompt_chars: int = 10_000
    max_image_side: int = 2048
    max_image_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images_per_request: int = 8
    max_loras_per_request: int = 8
    # Per principal: requests per second (token bucket, burst = 2 s worth; 0: off) and open
    # streams (generation, imports, watches; 0: off). Beyond: RESOURCE_EXHAUSTED + RetryInfo.
    rate_limit_per_second: float = 0.0
    max_streams_per_principal: int = 32
    # Keepalive pings and connection age; the grace lets long generation streams finish.
    keepalive_seconds: float = 30.0
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 3600.0
    # Prometheus metrics on HOST:PORT (path /metrics); empty: off.
    metrics_listen: str = ""
    # "text" or "json" (one JSON object per line).
    log_format: str = "text"
    # Cluster mode (docs/deploy.md): a NATS JetStream URL turns this server into a stateless
    # API replica whose jobs run on `loracle-worker`s; empty keeps the in-process executor.
    broker_url: str = ""
    # Prefix of every stream, subject and bucket, so deployments can share one NATS.
    broker_namespace: str = "loracle"
    # A worker that stops extending a job's lease this long loses it to another worker; a
    # job that started this many times without finishing fails.
    job_lease_seconds: float = 30.0
    job_max_attempts: int = 3
    # Also run a worker inside this server (cluster mode); its name in the directory.
    run_worker: bool = False
    worker_name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"sqlite:///{self.data_dir.resolve() / 'loracle.db'}"

    @property
    def resolved_lora_roots(self) -> tuple[Path, ...]:
        return self.lora_roots or (self.data_dir.resolve() / "loras",)


_ENV = {
    "listen": "LORACLE_LISTEN",
    "data_dir": "LORACLE_DATA_DIR",
    "storage_url": "LORACLE_STORAGE_URL",
    "lora_roots": "LORACLE_LORA_ROOTS",  # os.pathsep-separated
    "log_level": "LORACLE_LOG_LEVEL",
    "broker_url": "LORACLE_BROKER_URL",
}


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = str(kinds[name])
    try:
        if "Path" in kind and "tuple" in kind:
            items = value.split(os.pathsep) if isinstance(value, str) else list(value)
            return tuple(Path(str(v)).expanduser() for v in items if str(v))
        if "Path" in kind:
            return Path(str(value)).expanduser()
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return str(value)
    except (TypeError, ValueError):
        raise ValidationError(FieldViolation(name, f"invalid value {value!r}")) from None


def _models(tables: Any, base: Path) -> tuple[BaseModelConfig, ...]:
    if not isinstance(tables, list):
        raise ValidationError(FieldViolation("models", "must be an array of [[models]] tables"))
    out = []
    names: set[str] = set()
    for i, table in enumerate(tables):
        where = f"models[{i}]"
        if not isinstance(table, dict):
            raise ValidationError(FieldViolation(where, "must be a table"))
        name, path = str(table.get("name", "")).strip(), str(table.get("path", "")).strip()
        if not name or name in names:
            raise ValidationError(FieldViolation(f"{where}.name", "required and unique"))
        if not path:
            raise ValidationError(FieldViolation(f"{where}.path", "required"))
        names.add(name)
        try:
            arch = resolve_architecture(str(table.get("architecture", "")))
        except ValidationError as exc:
            raise ValidationError(
                FieldViolation(f"{where}.architecture", exc.violations[0].description)
            ) from None
        try:
            budget = float(table.get("vram_budget_gb", 0.0))
        except (TypeError, ValueError):
            raise ValidationError(
                FieldViolation(f"{where}.vram_budget_gb", "must be a number")
            ) from None
        config_dir = str(table.get("config_dir", "")).strip()
        out.append(
            BaseModelConfig(
                name=name,
                architecture=arch,
                path=_resolve(path, base),
                scheduler=str(table.get("scheduler", "")),
                dtype=str(table.get("dtype", "auto")),
                vram_budget_gb=budget,
                config_dir=_resolve(config_dir, base) if config_dir else None,
            )
        )
    return tuple(out)


def _tokens(tables: Any) -> tuple[TokenConfig, ...]:
    if not isinstance(tables, list):
        raise ValidationError(FieldViolation("tokens", "must be an array of [[tokens]] tables"))
    out: list[TokenConfig] = []
    for i, table in enumerate(tables):
        where = f"tokens[{i}]"
        if not isinstance(table, dict):
            raise ValidationError(FieldViolation(where, "must be a table"))
        unknown = set(table) - {"name", "sha256", "scopes"}
        if unknown:
            raise ValidationError(
                FieldViolation(where, f"unknown keys {sorted(unknown)} (name, sha256, scopes)")
            )
        name = str(table.get("name", "")).strip()
        digest = str(table.get("sha256", "")).strip().lower()
        scopes = table.get("scopes", [])
        if not name or name in {t.name for t in out}:
            raise ValidationError(FieldViolation(f"{where}.name", "required and unique"))
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValidationError(
                FieldViolation(f"{where}.sha256", "the token's SHA-256 as 64 hex digits")
            )
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise ValidationError(
                FieldViolation(f"{where}.scopes", f"a non-empty list of {', '.join(SCOPES)}")
            )
        out.append(TokenConfig(name, digest, frozenset(str(x) for x in scopes)))
    return tuple(out)


def _resolve(path: str, base: Path) -> Path:
    """A path from the TOML file: relative ones are relative to that file's folder."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else base / resolved


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "loracle-server",
) -> Settings:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--listen", help="HOST:PORT to serve gRPC on (default 127.0.0.1:50051)")
    parser.add_argument("--data-dir", help="where the SQLite store and default LoRA root live")
    parser.add_argument("--config", help="TOML settings file (keys as in Settings)")
    parser.add_argument("--storage-url", help="sqlite:///PATH or postgresql://USER@HOST/DB")
    parser.add_argument(
        "--lora-root",
        action="append",
        dest="lora_roots",
        help="directory LoRA files may be registered from (repeatable)",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--no-embedded-model",
        dest="embedded_model",
        action="store_false",
        default=None,
        help="do not build the tiny placeholder model when no model is configured",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates")
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback listen address without authentication and TLS",
    )
    parser.add_argument("--metrics-listen", help="HOST:PORT to serve Prometheus /metrics on")
    parser.add_argument("--log-format", choices=["text", "json"], help="log line format")
    parser.add_argument("--max-queue", type=int, help="generation jobs that may wait (16)")
    parser.add_argument("--max-batch", type=int, help="images generated together (8)")
    parser.add_argument(
        "--batch-wait-ms", type=float, help="wait for compatible jobs to batch with (10)"
    )
    parser.add_argument("--broker-url", help="nats://HOST:PORT: run as a cluster API replica")
    parser.add_argument("--worker-name", help="this worker's name in the cluster directory")
    parser.add_argument(
        "--rebuild-projections",
        action="store_true",
        default=None,
        help="drop the read models and rebuild them from the event log",
    )
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    values: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValidationError(FieldViolation("config", f"{path}: {exc}")) from None
        known = {f.name for f in fields(Settings)} - {"models", "tokens"}
        if "models" in data:
            values["models"] = _models(data.pop("models"), path.parent)
        if "tokens" in data:
            values["tokens"] = _tokens(data.pop("tokens"))
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            if key in data:
                data[key] = str(_resolve(str(data[key]), path.parent))
        for key, value in data.items():
            if key in known:
                values[key] = _coerce(key, value)
            else:
                values.setdefault("extra", {})[key] = value
    for name, var in _ENV.items():
        if env.get(var):
            values[name] = _coerce(name, env[var])
    for name in (
        "embedded_model",
        "listen",
        "data_dir",
        "storage_url",
        "lora_roots",
        "log_level",
        "rebuild_projections",
        "max_queue",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "insecure",
        "metrics_listen",
        "log_format",
        "max_batch",
        "batch_wait_ms",
        "broker_url",
        "worker_name",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = _coerce(name, value)
    return replace(Settings(), **values)
