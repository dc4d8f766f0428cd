"""The layer rules of docs/architecture.md, checked over every module's imports (function-level
imports included, since heavy libraries are imported lazily). A new module is covered by
itself; a rule broken on purpose needs its reason written here."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Dev-only builders of test models and the benchmark harness: they build tiny pipelines with
# torch, run servers and clients in-process, and nothing in production imports them.
DEVTOOLS = "server.devtools"


def _modules() -> Iterator[tuple[str, Path]]:
    for top in ("server", "client"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


MODULES = dict(_modules())


def _imports(module: str, path: Path) -> set[str]:
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _offenders(importers: list[str], *imported: str) -> dict[str, list[str]]:
    found = {
        module: sorted(n for n in IMPORTS[module] if _within(n, *imported)) for module in importers
    }
    return {module: names for module, names in found.items() if names}


def _all_except(*allowed: str) -> list[str]:
    return [m for m in MODULES if not _within(m, *allowed)]


def test_the_tree_is_found() -> None:
    assert "server.bootstrap" in MODULES
    assert "client.async_client" in MODULES
    assert "grpc" in IMPORTS["server.rpc.errors"]  # the parser sees what a module imports


def test_only_rpc_and_client_import_grpc() -> None:
    assert _offenders(_all_except("server.rpc", "client", DEVTOOLS), "grpc") == {}


def test_only_diffusion_imports_torch_or_diffusers() -> None:
    heavy = ("torch", "diffusers", "transformers", "peft", "safetensors.torch")
    allowed = ("server.infrastructure.diffusion", DEVTOOLS)
    assert _offenders(_all_except(*allowed), *heavy) == {}


def test_nothing_outside_devtools_imports_devtools() -> None:
    assert _offenders(_all_except(DEVTOOLS), DEVTOOLS) == {}


def test_infrastructure_does_not_import_the_composition_root_or_handlers() -> None:
    infrastructure = [m for m in MODULES if _within(m, "server.infrastructure")]
    forbidden = ("server.bootstrap", "server.application.commands", "server.application.queries")
    assert _offenders(infrastructure, *forbidden) == {}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("server.domain", ("server.application", "server.infrastructure", "server.rpc")),
        ("server.application", ("server.infrastructure", "server.rpc", "server.bootstrap")),
    ],
)
def test_inner_layers_do_not_import_outer_ones(layer: str, forbidden: tuple[str, ...]) -> None:
    modules = [m for m in MODULES if _within(m, layer)]
    assert modules
    assert _offenders(modules, *forbidden) == {}
