"""The architecture as a test: which layer may import which, and contracts stay contracts.

Read from the source (every ``import`` and ``from … import``, also inside functions), so
a lazy import cannot hide a dependency that points the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: layer -> the radstream layers it may import (the README's table)
ALLOWED = {
    "schemas": set(),
    "adapters": {"schemas"},
    "deid": {"schemas"},
    "engines": {"schemas", "adapters"},
    "gateways": {"schemas", "adapters"},
    "streams": {"schemas", "adapters", "deid", "engines"},
    "radstream": {"schemas", "adapters", "deid", "engines", "gateways", "streams"},
    "load": {"schemas", "adapters", "deid", "engines", "gateways", "streams", "radstream"},
}
#: client and runtime libraries the contracts must not need
CLIENTS = {"boto3", "botocore", "obstore", "confluent_kafka", "clickhouse_connect", "structlog", "prometheus_client",
           "pydicom", "chdb", "faust", "aiohttp", "pynetdicom"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules_of(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = {
        f"{path.relative_to(REPO)} imports {module}"
        for path in modules_of(layer)
        for module in imported_modules(path)
        if (top := module.split(".")[0]) in ALLOWED and top != layer and top not in ALLOWED[layer]
    }
    assert not wrong, sorted(wrong)


def test_schemas_hold_contracts_only() -> None:
    clients = {
        f"{path.relative_to(REPO)} imports {module}"
        for path in modules_of("schemas")
        for module in imported_modules(path)
        if module.split(".")[0] in CLIENTS
    }
    assert not clients, sorted(clients)


def test_no_import_loop_between_modules() -> None:
    """Not even through a lazy import (schemas/blobs.py and blobs_s3.py once imported each other)."""
    names = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for layer in ALLOWED for path in modules_of(layer)}
    graph = {name: {module for module in imported_modules(path) if module in names and module != name}
             for name, path in names.items()}
    loops = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not loops, loops
