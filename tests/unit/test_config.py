"""Settings precedence: flags, then environment, then the TOML file, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import Settings, load_settings
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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('[[models]]\nname = "a"\narchitecture = "Potato"\npath = "x"\n', "models[0].architecture"),
        ('[[models]]\narchitecture = "SD1"\npath = "x"\n', "models[0].name"),
        ('[[models]]\nname = "a"\narchitecture = "SD1"\n', "models[0].path"),
    ],
)
def test_bad_model_tables_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(body)
    with pytest.raises(ValidationError) as err:
        load_settings(["--config", str(config)], environ={})
    assert err.value.violations[0].field == field
