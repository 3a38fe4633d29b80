"""The architecture as the folders show it: data flows one way, Flower stays in its shell,
and a client process loads nothing of the server's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "fedcollm"

# config -> models, data -> evaluation, preflight -> algorithm -> tracking -> federation ->
# experiments -> cli. A module may import its own layer and the layers before it.
LAYERS = {
    "config": 0,
    "seeds": 0,
    "registry": 0,
    "keystream": 0,
    "dp": 0,
    "errors": 0,
    "lazy": 0,
    "console": 0,
    "models": 1,
    "data": 1,
    "evaluation": 2,
    "preflight": 2,
    "plan": 2,
    "algorithm": 3,
    "tracking": 4,
    "federation": 5,
    "experiments": 6,
    "cli": 7,
}
# What a client process runs: it must not reach the server's bookkeeping.
CLIENT_SIDE = [
    "federation/client_app.py",
    "federation/secure_client.py",
    "federation/masks.py",
    "federation/wire.py",
]
SERVER_ONLY = [
    "fedcollm.algorithm.server",
    "fedcollm.algorithm.distillation",
    "fedcollm.algorithm.round",
    "fedcollm.federation.rounds",
    "fedcollm.federation.server_app",
    "fedcollm.federation.secure_server",
    "fedcollm.federation.screening",
    "fedcollm.federation.traffic",
    "fedcollm.tracking.checkpoint",
    "fedcollm.tracking.report",
    "fedcollm.experiments.methods",
]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    """Every module an import statement in `path` names, at any depth (lazy ones included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            if node.module == "fedcollm":  # `from fedcollm import seeds`
                names += [f"fedcollm.{alias.name}" for alias in node.names]
    return names


def test_every_module_belongs_to_a_layer():
    assert {_layer(p) for p in _modules()} - {"__init__"} <= set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path):
    if path == PACKAGE / "__init__.py":
        return
    own = LAYERS[_layer(path)]
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "fedcollm" and len(parts) > 1:
            assert LAYERS[parts[1]] <= own, f"{path.name} ({own}) imports {name}"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
        ".__init__"
    )


def test_no_import_circle_inside_the_package():
    """Every import counts, lazy ones inside functions too: a circle is a circle of ideas
    even where Python tolerates it."""
    graph = {
        _module_name(p): {n for n in _imports(p) if n.startswith("fedcollm.")} for p in _modules()
    }
    graph = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for name in sorted(graph[module]):
            if name in path:
                circles.append(path[path.index(name) :] + [name])
            elif name not in done:
                visit(name, [*path, name])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_only_the_federation_folder_imports_flower():
    importers = {
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if any(n.split(".")[0] == "flwr" for n in _imports(p))
    }
    assert importers and all(p.startswith("federation/") for p in importers), importers


def test_the_client_side_imports_nothing_of_flowers_server_api():
    # Flower's own package loads flwr.server when it is imported; what is checked here is
    # that our client code never uses it.
    for relative in CLIENT_SIDE:
        names = _imports(PACKAGE / relative)
        assert not [n for n in names if n.startswith(("flwr.server", "flwr.serverapp"))], relative


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_a_client_process_loads_none_of_the_servers_modules():
    loaded = _loaded_after("import fedcollm.federation.client_app")
    assert "fedcollm.federation.client_app" in loaded
    assert not loaded & set(SERVER_ONLY), sorted(loaded & set(SERVER_ONLY))


def test_the_algorithm_runs_without_flower():
    """Models, data, training, distillation, aggregation, evaluation, checkpoints and the
    reference round import in a fresh interpreter without Flower."""
    modules = [
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        for p in _modules()
        if _layer(p) in LAYERS and LAYERS[_layer(p)] <= LAYERS["tracking"]
    ]
    loaded = _loaded_after("; ".join(f"import {m}" for m in modules))
    assert "fedcollm.algorithm.round" in loaded and "torch" in loaded
    assert not {m for m in loaded if m.split(".")[0] == "flwr"}
