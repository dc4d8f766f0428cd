"""Settings precedence: flags, then environment, then the TOML file, then defaults."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import server.__main__ as server_main
import server.worker as worker_main
from server.config import (
    NOT_SETTINGS,
    Settings,
    SettingsError,
    env_of,
    flag_of,
    load_settings,
    settings_table,
)
from server.devtools.cluster import write_config
from server.domain.errors import ValidationError


def test_defaults() -> None:
    settings = load_settings([], environ={})
    assert settings.listen == "127.0.0.1:50051"
    assert settings.resolved_storage_url.startswith("sqlite:///")
    assert settings.resolved_storage_url.endswith("data/loracle.db")
    assert settings.resolved_lora_roots[0].name == "loras"


def test_flags_beat_env_beat_toml(tmp_path: Path) -> None:
    config = tmp_path / "loracle.toml"
    config.write_text(
        'listen = "0.0.0.0:1"\nlog_level = "DEBUG"\n'
        'lora_roots = ["/a", "/b"]\nstorage_url = "sqlite:///toml.db"\n'
    )
    env = {"LORACLE_LISTEN": "127.0.0.1:2", "LORACLE_STORAGE_URL": "sqlite:///env.db"}
    settings = load_settings(
        ["--config", str(config), "--storage-url", "sqlite:///flag.db"], environ=env
    )
    assert settings.listen == "127.0.0.1:2"
    assert settings.storage_url == "sqlite:///flag.db"
    assert settings.log_level == "DEBUG"
    assert settings.lora_roots == (Path("/a"), Path("/b"))


def test_repeatable_lora_roots_flag() -> None:
    settings = load_settings(["--lora-root", "/x", "--lora-root", "/y"], environ={})
    assert settings.resolved_lora_roots == (Path("/x"), Path("/y"))


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("listen = \n")
    with pytest.raises(ValidationError) as err:
        load_settings(["--config", str(config)], environ={})
    assert err.value.violations[0].field == "config"


def test_settings_are_immutable() -> None:
    with pytest.raises(AttributeError):
        Settings().listen = "x"  # type: ignore[misc]


def test_models_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "loracle.toml"
    config.write_text(
        '[[models]]\nname = "sd15"\narchitecture = "SD 1.5"\npath = "models/sd15"\n'
        '[[models]]\nname = "xl"\narchitecture = "SDXL"\npath = "/srv/xl.safetensors"\n'
        'dtype = "float16"\nvram_budget_gb = 12\n'
    )
    settings = load_settings(["--config", str(config)], environ={})
    sd15, xl = settings.models
    assert (sd15.name, sd15.architecture.value, sd15.path) == (
        "sd15",
        "SD1",
        tmp_path / "models/sd15",
    )
    assert (xl.dtype, xl.vram_budget_gb, xl.path) == ("float16", 12.0, Path("/srv/xl.safetensors"))


def test_a_model_entry_sets_its_own_defaults_quantization_and_offload(tmp_path: Path) -> None:
    body = (
        '[[models]]\nname = "zit"\narchitecture = "ZImageTurbo"\npath = "z"\n'
        "steps = 8\nguidance_scale = 0\nwidth = 832\nheight = 1216\n"
        'quantize = "fp8"\noffload = "model"\ncompile = true\n'
        '[[models]]\nname = "plain"\narchitecture = "Qwen"\npath = "q"\n'
    )
    zit, plain = load_settings(["--config", write(tmp_path, body)], environ={}).models
    assert (zit.default_steps, zit.default_guidance_scale) == (8, 0.0)
    assert (zit.default_width, zit.default_height) == (832, 1216)
    assert (zit.quantize, zit.offload, zit.compile) == ("fp8", "model", True)
    assert (plain.default_steps, plain.default_guidance_scale, plain.quantize) == (0, None, "")
    assert not plain.compile


@pytest.mark.parametrize(
    ("line", "field", "says"),
    [
        ("steps = 8.5", "models[0].steps", "must be a whole number from 1 to 150"),
        ("steps = 0", "models[0].steps", "must be a whole number from 1 to 150"),
        ('guidance_scale = "high"', "models[0].guidance_scale", "must be a number from 0 to 30"),
        ("width = 1004", "models[0].width", "must be a multiple of 8"),
        ('quantize = "nf4"', "models[0].quantize", "must be one of 'int8', 'fp8', or left out"),
        ('offload = "disk"', "models[0].offload", "'model', 'sequential', or left out"),
        ('compile = "yes"', "models[0].compile", "must be true or false"),
    ],
)
def test_bad_model_defaults_and_options_name_the_field(
    tmp_path: Path, line: str, field: str, says: str
) -> None:
    body = f'[[models]]\nname = "a"\narchitecture = "Flux.1 S"\npath = "x"\n{line}\n'
    with pytest.raises(ValidationError) as err:
        load_settings(["--config", write(tmp_path, body)], environ={})
    (violation,) = err.value.violations
    assert violation.field == field
    assert says in violation.description


def test_controlnets_from_toml(tmp_path: Path) -> None:
    body = (
        '[[controlnets]]\nname = "canny"\narchitecture = "SD 1.5"\npath = "cn/canny"\n'
        '[[controlnets]]\nname = "depth-xl"\narchitecture = "SDXL"\npath = "depth.safetensors"\n'
        'config_dir = "cn/depth-xl"\n'
    )
    canny, depth = load_settings(["--config", write(tmp_path, body)], environ={}).controlnets
    assert (canny.name, canny.architecture.value, canny.path, canny.config_dir) == (
        "canny",
        "SD1",
        tmp_path / "cn/canny",
        None,
    )
    assert (depth.path, depth.config_dir) == (
        tmp_path / "depth.safetensors",
        tmp_path / "cn/depth-xl",
    )
    with pytest.raises(SettingsError) as err:
        load_settings(["--config", write(tmp_path, body + "scale = 1\n")], environ={})
    assert err.value.message.startswith("unknown setting 'controlnets[1].scale'")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('[[models]]\nname = "a"\narchitecture = "Potato"\npath = "x"\n', "models[0].architecture"),
        ('[[models]]\narchitecture = "SD1"\npath = "x"\n', "models[0].name"),
        ('[[models]]\nname = "a"\narchitecture = "SD1"\n', "models[0].path"),
        (
            '[[controlnets]]\nname = "c"\narchitecture = "Potato"\npath = "x"\n',
            "controlnets[0].architecture",
        ),
        ('[[controlnets]]\narchitecture = "SD1"\npath = "x"\n', "controlnets[0].name"),
        ('[[controlnets]]\nname = "c"\narchitecture = "SD1"\n', "controlnets[0].path"),
        (
            '[[controlnets]]\nname = "c"\narchitecture = "SD1"\npath = "x"\n'
            '[[controlnets]]\nname = "c"\narchitecture = "SD1"\npath = "y"\n',
            "controlnets[1].name",
        ),
    ],
)
def test_bad_model_tables_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(body)
    with pytest.raises(ValidationError) as err:
        load_settings(["--config", str(config)], environ={})
    assert err.value.violations[0].field == field


# --- strict settings: unknown keys, wrong types, every source for every setting -------------

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, body: str) -> str:
    config = tmp_path / "loracle.toml"
    config.write_text(body)
    return str(config)


def test_an_unknown_toml_key_names_the_nearest_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(["--config", write(tmp_path, "max_queu = 3\n")], environ={})
    assert err.value.message == "unknown setting 'max_queu' (did you mean 'max_queue'?)"


def test_an_unknown_key_without_a_near_one(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(["--config", write(tmp_path, "zzz = 1\n")], environ={})
    assert err.value.message == "unknown setting 'zzz'"


def test_an_unknown_key_in_a_table(tmp_path: Path) -> None:
    body = '[[models]]\nname = "a"\narchitecture = "SD1"\npath = "x"\nvram_budget = 3\n'
    with pytest.raises(SettingsError) as err:
        load_settings(["--config", write(tmp_path, body)], environ={})
    assert err.value.message == (
        "unknown setting 'models[0].vram_budget' (did you mean 'models[0].vram_budget_gb'?)"
    )


def test_an_unknown_loracle_variable_names_the_nearest() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings([], environ={"LORACLE_MAX_QUEU": "3"})
    assert err.value.message == (
        "unknown setting 'LORACLE_MAX_QUEU' (did you mean 'LORACLE_MAX_QUEUE'?)"
    )


def test_the_clients_and_the_tests_variables_are_not_settings() -> None:
    settings = load_settings([], environ=dict.fromkeys(NOT_SETTINGS, "x") | {"HOME": "/"})
    assert settings == Settings()


def test_every_loracle_variable_in_the_code_is_a_setting_or_known_not_to_be() -> None:
    """A new LORACLE_* knob in a test or the CLI would otherwise stop every server it starts."""
    files = [ROOT / "Makefile"] + [
        p for d in ("server", "client", "tests", "bench") for p in (ROOT / d).rglob("*.py")
    ]
    found = {
        name
        for path in files
        if path != Path(__file__).resolve()
        for name in re.findall(r"LORACLE_[A-Z0-9_]+", path.read_text())
    }
    settings = {env_of(name) for name in Settings.model_fields}
    assert found - settings - NOT_SETTINGS == set()
    assert found >= NOT_SETTINGS  # none kept after its last user is gone


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (
            [],
            {"LORACLE_MAX_QUEUE": "many"},
            "'max_queue' (LORACLE_MAX_QUEUE) must be an integer, not 'many'",
        ),
        (
            ["--batch-wait-ms", "soon"],
            {},
            "'batch_wait_ms' (--batch-wait-ms) must be a number, not 'soon'",
        ),
        (
            [],
            {"LORACLE_INSECURE": "maybe"},
            "'insecure' (LORACLE_INSECURE) must be true or false, not 'maybe'",
        ),
        (
            [],
            {"LORACLE_LOG_FORMAT": "xml"},
            "'log_format' (LORACLE_LOG_FORMAT) must be one of 'text', 'json', not 'xml'",
        ),
    ],
)
def test_a_wrong_type_names_the_setting_and_the_type(
    argv: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(argv, environ=environ)
    assert err.value.message == f"setting {message}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("listen = 5\n", "setting 'listen' ({}) must be a string, not 5"),
        ("lora_roots = 5\n", "setting 'lora_roots' ({}) must be a list of paths, not 5"),
        ('tls_cert = ["a"]\n', "setting 'tls_cert' ({}) must be a path, not ['a']"),
    ],
)
def test_a_wrong_type_in_the_file(tmp_path: Path, body: str, message: str) -> None:
    config = write(tmp_path, body)
    with pytest.raises(SettingsError) as err:
        load_settings(["--config", config], environ={})
    assert err.value.message == message.format(config)


def test_a_table_variable_must_be_json() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings([], environ={"LORACLE_TOKENS": "[{"})
    assert err.value.message == "LORACLE_TOKENS must be a JSON array of tokens tables"


def test_each_source_beats_the_next(tmp_path: Path) -> None:
    config = write(tmp_path, "max_queue = 3\nmax_batch = 3\nmax_steps = 3\n")
    env = {"LORACLE_MAX_QUEUE": "2", "LORACLE_MAX_BATCH": "2"}
    settings = load_settings(["--config", config, "--max-queue", "1"], environ=env)
    assert (settings.max_queue, settings.max_batch, settings.max_steps) == (1, 2, 3)
    assert settings.max_image_side == Settings().max_image_side == 2048


def test_an_empty_variable_is_not_set() -> None:
    assert load_settings([], environ={"LORACLE_LISTEN": ""}).listen == "127.0.0.1:50051"


def other_value(name: str) -> tuple[str, object]:
    """A value unlike the default, as a flag or variable writes it, and as the model holds it."""
    default = getattr(Settings(), name)
    if name == "lora_roots":
        return os.pathsep.join(("/a", "/b")), (Path("/a"), Path("/b"))
    if name == "log_format":
        return "json", "json"
    if name == "token_key":
        return "ab" * 16, "ab" * 16
    if isinstance(default, bool):
        return str(not default).lower(), not default
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default + 1.5), default + 1.5
    if isinstance(default, Path) or default is None:
        return "/srv/x", Path("/srv/x")
    assert isinstance(default, str), name
    return "x:1", "x:1"


TABLES = ("models", "controlnets", "upscalers", "tokens")
SCALARS = [name for name in Settings.model_fields if name not in TABLES]


@pytest.mark.parametrize("name", SCALARS)
def test_every_setting_comes_from_the_environment(name: str) -> None:
    raw, value = other_value(name)
    assert getattr(load_settings([], environ={env_of(name): raw}), name) == value


@pytest.mark.parametrize("name", SCALARS)
def test_every_setting_comes_from_a_flag(name: str) -> None:
    raw, value = other_value(name)
    flag = flag_of(name)
    argv = [flag] if isinstance(value, bool) else [flag, raw]
    if name == "lora_roots":
        argv = [flag, "/a", flag, "/b"]
    assert getattr(load_settings(argv, environ={}), name) == value


def test_tables_come_from_the_environment_as_json() -> None:
    digest = "ab" * 32
    environ = {
        "LORACLE_MODELS": json.dumps([{"name": "m", "architecture": "SDXL", "path": "/m"}]),
        "LORACLE_TOKENS": json.dumps([{"name": "t", "sha256": digest, "scopes": ["read"]}]),
        "LORACLE_CONTROLNETS": json.dumps(
            [{"name": "canny", "architecture": "SD 1.5", "path": "/c", "config_dir": "/cd"}]
        ),
    }
    settings = load_settings([], environ=environ)
    assert [(m.name, m.architecture.value, m.path) for m in settings.models] == [
        ("m", "SDXL", Path("/m"))
    ]
    assert [(c.name, c.architecture.value, c.path, c.config_dir) for c in settings.controlnets] == [
        ("canny", "SD1", Path("/c"), Path("/cd"))
    ]
    assert [(t.name, t.sha256, t.scopes) for t in settings.tokens] == [
        ("t", digest, frozenset({"read"}))
    ]


def test_the_current_flag_spellings() -> None:
    """The README, Makefile, devtools and tests use these."""
    flags = {name: flag_of(name) for name in Settings.model_fields}
    assert {
        flags["lora_roots"],
        flags["embedded_model"],
        flags["rebuild_projections"],
        flags["insecure"],
        flags["data_dir"],
        flags["tls_client_ca"],
    } == {
        "--lora-root",
        "--no-embedded-model",
        "--rebuild-projections",
        "--insecure",
        "--data-dir",
        "--tls-client-ca",
    }
    assert flags["models"] == flags["tokens"] == ""


@pytest.mark.parametrize("entry", [server_main.main, worker_main.main])
def test_the_entry_points_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: Callable[[list[str]], int]
) -> None:
    assert entry(["--config", write(tmp_path, "max_queu = 3\n")]) == 2
    err = capsys.readouterr().err
    assert err.endswith(": unknown setting 'max_queu' (did you mean 'max_queue'?)\n")


def test_the_server_process_says_one_sentence_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in NOT_SETTINGS} | {
        "LORACLE_MAX_QUEUE": "many"
    }
    done = subprocess.run(
        [sys.executable, "-m", "server"], env=env, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr) == (
        2,
        "loracle-server: setting 'max_queue' (LORACLE_MAX_QUEUE) must be an integer, not 'many'\n",
    )


def readme_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- settings table: python -m server.config -->\n")[1]
    block = block.split("\n<!-- end of settings table -->")[0]
    lines = block.splitlines()[2:]  # past the header and the rule
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_the_readme_table_is_the_models() -> None:
    """Regenerate with `python -m server.config` when a setting changes."""
    rows = readme_table()
    names = [re.sub(r"`(\[\[)?(\w+)(\]\])?`.*", r"\2", row[0]) for row in rows]
    assert names == list(Settings.model_fields)
    for name, (_, flag, env, default, what) in zip(names, rows, strict=True):
        info = Settings.model_fields[name]
        assert flag.strip("`") == flag_of(name)
        assert env.split()[0] == f"`{env_of(name)}`"
        assert what == info.description
        if isinstance(info.json_schema_extra, dict) and "shown" in info.json_schema_extra:
            continue  # written for people (16 MiB)
        if default == "none":
            assert info.default in ("", (), None), name
        elif default in ("on", "off"):
            assert info.default is (default == "on"), name
        elif default.startswith("`"):
            assert default.strip("`") == info.default, name
        else:
            assert float(default) == info.default, name
    assert settings_table() in (ROOT / "README.md").read_text()  # and nothing else differs


def test_the_cluster_tools_config_loads(tmp_path: Path) -> None:
    """server/devtools/cluster.py writes one file for replicas and workers (lora_roots as one
    path string)."""
    config = write_config(
        tmp_path / "cluster.toml",
        broker_url="nats://127.0.0.1:4222",
        storage_url="sqlite:///x.db",
        lora_roots=str(tmp_path / "loras"),
        job_lease_seconds=2.0,
        batch_wait_ms=50,
        run_worker=True,
    )
    settings = load_settings(["--config", str(config)], environ={})
    assert settings.lora_roots == (tmp_path / "loras",)
    assert (settings.job_lease_seconds, settings.batch_wait_ms, settings.run_worker) == (
        2.0,
        50.0,
        True,
    )


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(["--version"], environ={})
    assert exited.value.code == 0
    assert (
        capsys.readouterr().out.strip() == f"loracle-server {importlib.metadata.version('loracle')}"
    )
