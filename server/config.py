"""Settings: one model, read from flags, `LORACLE_*` environment variables, a TOML file and
defaults, in that order of precedence. Every setting has an environment variable and (tables
aside) a flag, both derived from the model; an unknown key anywhere stops the start-up
(docs/decisions.md: strict settings with pydantic-settings). `python -m server.config` prints
the README's settings table."""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import json
import os
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic
import pydantic_settings
from pydantic import AfterValidator, Field, JsonValue, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from server.domain.errors import FieldViolation, Reason, ValidationError
from server.domain.models import (
    OFFLOADS,
    QUANTIZATIONS,
    Architecture,
    BaseModelConfig,
    ControlNetConfig,
    UpscalerModelConfig,
    resolve_architecture,
)
from server.domain.tokens import parse_key
from server.domain.upscalers import builtin_names

SCOPES = ("read", "write", "generate", "admin")
ENV_PREFIX = "LORACLE_"
# LORACLE_* variables that are not settings: the CLI's and the Node examples' (the server's
# address and token) and the test suites' knobs. A start-up in a shell that has them is fine.
NOT_SETTINGS = frozenset(
    {
        "LORACLE_ADDRESS",
        "LORACLE_SERVER",
        "LORACLE_TOKEN",
        "LORACLE_TEST_POSTGRES_URL",
        "LORACLE_FUZZ_EXAMPLES",
        "LORACLE_CRASH_ROUNDS",
        "LORACLE_LOAD_SECONDS",
        "LORACLE_LOAD_QUERIES",
        "LORACLE_SOAK_ROUNDS",
        "LORACLE_STORM_CLIENTS",
        "LORACLE_STORM_ROUNDS",
        "LORACLE_STORM_SEED",
    }
)
_UPSCALER_KEYS = ("name", "path")
_CONTROLNET_KEYS = ("name", "architecture", "path", "config_dir")
_MODEL_KEYS = (
    "name",
    "architecture",
    "path",
    "scheduler",
    "dtype",
    "vram_budget_gb",
    "config_dir",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "quantize",
    "offload",
    "compile",
)
# What a `[[models]]` entry may set instead of its family's default, and the range each takes.
_MODEL_DEFAULTS: dict[str, tuple[type, float, float]] = {
    "width": (int, 64, 4096),
    "height": (int, 64, 4096),
    "steps": (int, 1, 150),
    "guidance_scale": (float, 0.0, 30.0),
}
_TOKEN_KEYS = ("name", "sha256", "scopes")
_PATHS_IN_TOML = ("tls_cert", "tls_key", "tls_client_ca")  # relative to the file's folder


class SettingsError(ValidationError):
    """A setting that cannot be used; the message is one sentence that names it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(FieldViolation(key, problem))
        self.reason = Reason.INVALID_SETTING
        self.message = problem
        self.args = (problem,)


@dataclass(frozen=True, slots=True)
class TokenConfig:
    """A bearer token as configured: its SHA-256 (the token itself is never stored)."""

    name: str
    sha256: str
    scopes: frozenset[str]


UserPath = Annotated[Path, AfterValidator(Path.expanduser)]


def _setting(default: Any, description: str, *, shown: str = "", flag: str | None = None) -> Any:
    """A field; `shown` is the default as the README writes it, `flag` overrides the derived
    flag name ("" for none)."""
    extra: dict[str, JsonValue] = {"shown": shown} if shown else {}
    if flag is not None:
        extra["flag"] = flag
    return Field(default, description=description, json_schema_extra=extra or None)


class Settings(BaseSettings):
    """Constructed directly (as tests do) it takes only its arguments; `load_settings` adds
    the flags, the environment and the TOML file."""

    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_ignore_empty=True
    )

    listen: str = _setting("127.0.0.1:50051", "HOST:PORT to serve gRPC on")
    data_dir: UserPath = _setting(
        Path("./data"), "where the SQLite store and the default LoRA root live", shown="`./data`"
    )
    storage_url: str = _setting(
        "",
        "`sqlite:///PATH` or `postgresql://USER@HOST/DB[?schema=NAME]`",
        shown="`sqlite:///<data_dir>/loracle.db`",
    )
    lora_roots: Annotated[tuple[UserPath, ...], NoDecode] = _setting(
        (),
        "directories LoRA files may be registered from (the flag is repeatable)",
        shown="`<data_dir>/loras`",
        flag="--lora-root",
    )
    max_header_bytes: int = _setting(
        16 * 1024 * 1024, "safetensors headers larger than this are refused", shown="16 MiB"
    )
    max_message_bytes: int = _setting(
        16 * 1024 * 1024,
        "one gRPC message, either way; an `ImportLoraCatalog` request may be this large, "
        "any other request 1 MiB (see [Limits](#limits))",
        shown="16 MiB",
    )
    shutdown_grace_seconds: float = _setting(
        10.0, "on SIGTERM, how long running calls (and a worker's jobs) may finish"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = _setting(
        "text", "`json` writes one JSON object per line (see [Operations](#operations))"
    )
    rebuild_projections: bool = _setting(
        False, "drop the read models and rebuild them from the event log"
    )
    models: tuple[BaseModelConfig, ...] = _setting(
        (),
        "`[[models]]` tables (see [Base models](#base-models)); none: the embedded placeholder",
        flag="",
    )
    controlnets: tuple[ControlNetConfig, ...] = _setting(
        (),
        "`[[controlnets]]` tables (see [ControlNet](#controlnet)); none: requests' `controls` "
        "are refused",
        flag="",
    )
    upscalers: tuple[UpscalerModelConfig, ...] = _setting(
        (),
        "`[[upscalers]]` tables (see [Upscalers](#upscalers)): ESRGAN-family models for the "
        "hires fix and `UpscaleImage`",
        flag="",
    )
    embedded_model: bool = _setting(
        True, "build the tiny placeholder model when no `[[models]]` is configured"
    )
    max_queue: int = _setting(16, "generation jobs that may wait; more get `RESOURCE_EXHAUSTED`")
    max_batch: int = _setting(8, "images generated together in one batch")
    batch_wait_ms: float = _setting(
        10.0, "how long a job waits for compatible jobs to join its batch"
    )
    device_budget_gb: float = _setting(
        0.0,
        "device memory for resident models (0: no limit); least recently used are unloaded",
    )
    adapter_budget_gb: float = _setting(
        2.0, "LoRA adapters kept loaded per model (least recently used evicted)"
    )
    mixed_lora_batches: bool = _setting(
        True,
        "jobs asking for different LoRAs share a batch, each row adding its own LoRAs' deltas "
        "(false: each LoRA set runs as a batch of its own, fused)",
    )
    image_retention_hours: float = _setting(
        24.0, "finished images kept in `<data_dir>/generations` for `WatchGeneration`"
    )
    torch_threads: int = _setting(
        0,
        "torch CPU threads of the generation worker; 0: one fewer than the CPUs this process "
        "may use (at least 1), leaving one to serve requests",
    )
    tokens: tuple[TokenConfig, ...] = _setting(
        (),
        "`[[tokens]]` tables (name, sha256, scopes); none: no authentication, accepted only "
        "on loopback unless `insecure` (see [Security](#security))",
        flag="",
    )
    tls_cert: UserPath | None = _setting(None, "PEM certificate chain: serve TLS")
    tls_key: UserPath | None = _setting(None, "PEM private key of `tls_cert`")
    tls_client_ca: UserPath | None = _setting(
        None, "PEM CA bundle: require client certificates it signed (mutual TLS)"
    )
    insecure: bool = _setting(
        False, "listen beyond loopback without tokens and TLS anyway (logged loudly)"
    )
    max_prompt_chars: int = _setting(10_000, "prompt and negative prompt")
    max_image_side: int = _setting(2048, "width and height of a generated image")
    max_image_pixels: int = _setting(2048 * 2048, "width times height", shown="2048 * 2048")
    max_steps: int = _setting(150, "denoising steps (and `preview_every_n_steps`)")
    query_cache_entries: int = _setting(2048, "answers the query cache keeps (LRU)")
    query_cache_mib: float = _setting(
        64.0, "estimated MiB the query cache keeps; an answer over a sixteenth is not kept"
    )
    max_input_image_bytes: int = _setting(
        8 * 1024 * 1024, "bytes of one input image (init image, mask)", shown="8 MiB"
    )
    max_input_image_pixels: int = _setting(
        4096 * 4096, "pixels of one input image", shown="4096 * 4096"
    )
    max_images_per_request: int = _setting(8, "images in one request")
    max_loras_per_request: int = _setting(8, "LoRAs in one request (fields and tags)")
    rate_limit_per_second: float = _setting(
        0.0, "requests per second per principal (token bucket, bursts of 2 s worth; 0: off)"
    )
    max_streams_per_principal: int = _setting(
        32, "open streams per principal (generation, imports, watches; 0: off)"
    )
    keepalive_seconds: float = _setting(
        30.0, "server pings on idle connections, so dead peers of long streams are found"
    )
    handshake_timeout_seconds: float = _setting(
        10.0, "a connection that has not completed its HTTP/2 (and TLS) handshake is closed"
    )
    max_connection_age_seconds: float = _setting(
        1800.0, "connections are recycled (load balancers can rebalance)"
    )
    max_connection_age_grace_seconds: float = _setting(
        3600.0, "a running stream's time to finish on a recycled connection"
    )
    metrics_listen: str = _setting(
        "", "HOST:PORT to serve Prometheus `/metrics` on (see [Operations](#operations))"
    )
    broker_url: str = _setting(
        "",
        "`nats://HOST:PORT` makes this server a cluster API replica whose jobs run on "
        "`loracle-worker`s (see [Cluster mode](#cluster-mode)); empty: single machine",
    )
    broker_namespace: str = _setting(
        "loracle", "prefix of every stream, subject and bucket, so deployments share one NATS"
    )
    job_lease_seconds: float = _setting(
        30.0, "a worker that stops extending a job's lease this long loses it to another"
    )
    job_max_attempts: int = _setting(3, "starts before a job fails with the reason")
    run_worker: bool = _setting(False, "also run a cluster worker inside this server")
    worker_name: str = _setting(
        "", "a worker's name in the cluster directory and job claims", shown="`hostname-pid`"
    )
    token_key: str = _setting(
        "",
        "HMAC key of page and consistency tokens (hex or base64, at least 16 bytes); empty: "
        "a random key kept in the store, shared by the replicas using it",
        shown="random, stored",
    )

    @field_validator("token_key")
    @classmethod
    def _token_key(cls, value: str) -> str:
        if value:
            try:
                parse_key(value)
            except ValueError as exc:
                raise SettingsError("token_key", f"token_key {exc}") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        return (init_settings,)  # load_settings merges the other sources itself

    @field_validator("lora_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):  # the environment's (and the cluster tool's) PATH:PATH
            value = value.split(os.pathsep)
        if isinstance(value, list):
            return [v for v in value if v != ""]
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _model_tables(cls, value: object) -> object:
        # The TOML file's tables arrive built (relative to its folder), the environment's not.
        return value if isinstance(value, tuple) else _models(value, Path())

    @field_validator("controlnets", mode="before")
    @classmethod
    def _controlnet_tables(cls, value: object) -> object:
        return value if isinstance(value, tuple) else _controlnets(value, Path())

    @field_validator("upscalers", mode="before")
    @classmethod
    def _upscaler_tables(cls, value: object) -> object:
        return value if isinstance(value, tuple) else _upscalers(value, Path())

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_tables(cls, value: object) -> object:
        return value if isinstance(value, tuple) else _tokens(value)

    def __setattr__(self, name: str, value: object) -> None:
        # As a frozen dataclass would (pydantic raises its ValidationError, a ValueError).
        raise AttributeError(f"settings are read-only: cannot set {name!r}")

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"sqlite:///{self.data_dir.resolve() / 'loracle.db'}"

    @property
    def resolved_lora_roots(self) -> tuple[Path, ...]:
        return self.lora_roots or (self.data_dir.resolve() / "loras",)


def _extra(info: FieldInfo, key: str) -> str | None:
    extra = info.json_schema_extra
    value = extra.get(key) if isinstance(extra, dict) else None
    return value if isinstance(value, str) else None


def flag_of(name: str) -> str:
    """The flag of a setting ("" for tables): `--max-queue`, `--no-embedded-model`."""
    info = Settings.model_fields[name]
    given = _extra(info, "flag")
    if given is not None:
        return given
    kebab = name.replace("_", "-")
    return f"--no-{kebab}" if info.default is True else f"--{kebab}"


def env_of(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _unknown(key: str, known: Sequence[str]) -> SettingsError:
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return SettingsError(key, f"unknown setting {key!r}{hint}")


def _models(tables: Any, base: Path) -> tuple[BaseModelConfig, ...]:
    out = []
    for where, table in _tables(tables, "models", _MODEL_KEYS):
        try:
            budget = float(table.get("vram_budget_gb", 0.0))
        except (TypeError, ValueError):
            raise ValidationError(
                FieldViolation(f"{where}.vram_budget_gb", "must be a number")
            ) from None
        config_dir = str(table.get("config_dir", "")).strip()
        out.append(
            BaseModelConfig(
                name=str(table["name"]).strip(),
                architecture=_architecture(where, table),
                path=_resolve(str(table["path"]).strip(), base),
                scheduler=str(table.get("scheduler", "")),
                dtype=str(table.get("dtype", "auto")),
                vram_budget_gb=budget,
                config_dir=_resolve(config_dir, base) if config_dir else None,
                quantize=_choice(where, table, "quantize", QUANTIZATIONS),
                offload=_choice(where, table, "offload", OFFLOADS),
                compile=_flag(where, table, "compile"),
                **_model_defaults(where, table),
            )
        )
    return tuple(out)


def _choice(where: str, table: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = str(table.get(key, "")).strip().lower()
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed if a)
        raise ValidationError(
            FieldViolation(f"{where}.{key}", f"must be one of {shown}, or left out")
        )
    return value


def _flag(where: str, table: dict[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(FieldViolation(f"{where}.{key}", "must be true or false"))
    return value


def _model_defaults(where: str, table: dict[str, Any]) -> dict[str, Any]:
    """The defaults a model entry sets for requests that leave them at 0 (a distilled
    checkpoint's 4 or 8 steps, a base model's guidance)."""
    out: dict[str, Any] = {}
    for key, (kind, low, high) in _MODEL_DEFAULTS.items():
        if key not in table:
            continue
        value = table[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            not number
            or (kind is int and not float(value).is_integer())
            or not low <= value <= high
        ):
            what = "a whole number" if kind is int else "a number"
            raise ValidationError(
                FieldViolation(f"{where}.{key}", f"must be {what} from {low:g} to {high:g}")
            )
        if key in ("width", "height") and int(value) % 8:
            raise ValidationError(FieldViolation(f"{where}.{key}", "must be a multiple of 8"))
        out[f"default_{key}"] = kind(value)
    return out


def _tables(tables: Any, kind: str, keys: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """`[[kind]]` tables as (where, table), each with only known keys and a unique name."""
    if not isinstance(tables, list):
        raise ValidationError(FieldViolation(kind, f"must be an array of [[{kind}]] tables"))
    out: list[tuple[str, dict[str, Any]]] = []
    names: set[str] = set()
    for i, table in enumerate(tables):
        where = f"{kind}[{i}]"
        if not isinstance(table, dict):
            raise ValidationError(FieldViolation(where, "must be a table"))
        for key in table:
            if key not in keys:
                raise _unknown(f"{where}.{key}", [f"{where}.{k}" for k in keys])
        name = str(table.get("name", "")).strip()
        if not name or name in names:
            raise ValidationError(FieldViolation(f"{where}.name", "required and unique"))
        if not str(table.get("path", "")).strip():
            raise ValidationError(FieldViolation(f"{where}.path", "required"))
        names.add(name)
        out.append((where, table))
    return out


def _architecture(where: str, table: dict[str, Any]) -> Architecture:
    try:
        return resolve_architecture(str(table.get("architecture", "")))
    except ValidationError as exc:
        raise ValidationError(
            FieldViolation(f"{where}.architecture", exc.violations[0].description)
        ) from None


def _controlnets(tables: Any, base: Path) -> tuple[ControlNetConfig, ...]:
    out = []
    for where, table in _tables(tables, "controlnets", _CONTROLNET_KEYS):
        config_dir = str(table.get("config_dir", "")).strip()
        out.append(
            ControlNetConfig(
                name=str(table["name"]).strip(),
                architecture=_architecture(where, table),
                path=_resolve(str(table["path"]).strip(), base),
                config_dir=_resolve(config_dir, base) if config_dir else None,
            )
        )
    return tuple(out)


def _upscalers(tables: Any, base: Path) -> tuple[UpscalerModelConfig, ...]:
    builtin = {name.casefold() for name in builtin_names()}
    out = []
    for where, table in _tables(tables, "upscalers", _UPSCALER_KEYS):
        name = str(table["name"]).strip()
        if name.casefold() in builtin:
            raise ValidationError(
                FieldViolation(f"{where}.name", f"{name!r} is a built-in upscaler's name")
            )
        out.append(UpscalerModelConfig(name, _resolve(str(table["path"]).strip(), base)))
    return tuple(out)


def _tokens(tables: Any) -> tuple[TokenConfig, ...]:
    if not isinstance(tables, list):
        raise ValidationError(FieldViolation("tokens", "must be an array of [[tokens]] tables"))
    out: list[TokenConfig] = []
    for i, table in enumerate(tables):
        where = f"tokens[{i}]"
        if not isinstance(table, dict):
            raise ValidationError(FieldViolation(where, "must be a table"))
        for key in table:
            if key not in _TOKEN_KEYS:
                raise _unknown(f"{where}.{key}", [f"{where}.{k}" for k in _TOKEN_KEYS])
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


def _expected(annotation: Any) -> str:
    """What a value of this type looks like, for error messages."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _expected(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_expected(args[0]).removeprefix('a ')}s"
    names = {bool: "true or false", int: "an integer", float: "a number", Path: "a path"}
    return names.get(annotation, "a string")


def _version() -> str:
    try:
        return importlib.metadata.version("loracle")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Settings come from these flags, then LORACLE_* environment variables, "
        "then the --config file, then defaults (README: Running the server).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="TOML settings file (keys as the settings' names)")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version"
    )
    for name, info in Settings.model_fields.items():
        flag = flag_of(name)
        if not flag:
            continue
        help_text = (info.description or "").replace("%", "%%").replace("`", "")
        if info.annotation is bool:
            action = "store_false" if flag.startswith("--no-") else "store_true"
            parser.add_argument(flag, dest=name, action=action, help=help_text)
            continue
        metavar = flag.removeprefix("--").replace("-", "_").upper()
        if get_origin(info.annotation) is tuple:
            parser.add_argument(flag, dest=name, action="append", metavar=metavar, help=help_text)
        elif get_origin(info.annotation) is Literal:
            choices = get_args(info.annotation)
            parser.add_argument(flag, dest=name, choices=choices, help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=metavar, help=help_text)
    return parser


class _Environment(EnvSettingsSource):
    """The `LORACLE_*` variables of `environ` rather than of `os.environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, False, True)


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    known = [env_of(name) for name in Settings.model_fields]
    for var in environ:
        upper = var.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and upper not in NOT_SETTINGS:
            raise _unknown(upper, known)
    try:
        return dict(_Environment(environ)())
    except pydantic_settings.SettingsError:  # a table variable that is not JSON
        for name in ("models", "controlnets", "upscalers", "tokens"):
            try:
                json.loads(environ.get(env_of(name)) or "null")
            except ValueError:
                raise SettingsError(
                    name, f"{env_of(name)} must be a JSON array of {name} tables"
                ) from None
        raise


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValidationError(FieldViolation("config", f"{path}: {exc}")) from None
    for key in data:
        if key not in Settings.model_fields:
            raise _unknown(key, list(Settings.model_fields))
    if "models" in data:
        data["models"] = _models(data["models"], path.parent)
    if "controlnets" in data:
        data["controlnets"] = _controlnets(data["controlnets"], path.parent)
    if "upscalers" in data:
        data["upscalers"] = _upscalers(data["upscalers"], path.parent)
    for key in _PATHS_IN_TOML:
        if isinstance(data.get(key), str):
            data[key] = str(_resolve(data[key], path.parent))
    return data


def load_settings(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str = "loracle-server",
) -> Settings:
    """Raises `SettingsError` (or `ValidationError` for a bad table or an unreadable file)
    naming the setting; the entry points print it and exit 2."""
    flags = vars(_parser(prog).parse_args(argv))
    config = flags.pop("config", None)
    env = _from_environment(os.environ if environ is None else environ)
    toml = _from_toml(Path(config)) if config else {}
    origin = {k: f" ({config})" for k in toml}
    origin |= {k: f" ({env_of(k)})" for k in env} | {k: f" ({flag_of(k)})" for k in flags}
    try:
        return Settings(**(toml | env | flags))
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        key = str(error["loc"][0])
        if error["type"] == "extra_forbidden":
            raise _unknown(key, list(Settings.model_fields)) from None
        expected = _expected(Settings.model_fields[key].annotation)
        got = flags.get(key, env.get(key, toml.get(key)))
        raise SettingsError(
            key, f"setting {key!r}{origin.get(key, '')} must be {expected}, not {got!r}"
        ) from None


def _shown_default(name: str, info: FieldInfo) -> str:
    shown = _extra(info, "shown")
    if shown:
        return shown
    value = info.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in ("", (), None):
        return "none"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if isinstance(value, (str, Path)) else str(value)


def settings_table() -> str:
    """The README's settings table (tests/unit/test_config.py keeps the two equal)."""
    rows = [
        "| Setting (TOML key) | Flag | Environment | Default | What |",
        "|---|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        flag = flag_of(name)
        env = f"`{env_of(name)}`"
        if NoDecode in info.metadata:
            env += f" (`{os.pathsep}`-separated)"
        elif get_origin(info.annotation) is tuple:
            env += " (JSON)"
        key = f"`[[{name}]]` tables" if not flag else f"`{name}`"
        flag_text = f"`{flag}`" if flag else ""
        row = [key, flag_text, env, _shown_default(name, info), info.description or ""]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())


def cpu_threads(configured: int) -> int:
    """The torch threads a worker gets: as configured, or for 0 every CPU this process may run
    on (its affinity, which containers and taskset narrow) but one, for the event loop, the
    recorder and the projector."""
    if configured > 0:
        return configured
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available = os.cpu_count() or 1
    return max(1, available - 1)
