"""The layout README's "Architecture" section draws, held against the code's imports.

Read from the source with ast (nothing is imported), so a new import that crosses a
boundary, closes a cycle or grows a module past its size fails here, not in review.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"routerd": ROOT / "routerd", "routerd_client": ROOT / "client" / "routerd_client"}

# What the routing core may never reach, directly or through another module.
CORE_FORBIDDEN = (
    "aiohttp",
    "httptools",
    "httpx",
    "httpcore",
    "h11",
    "uvicorn",
    "socket",
    "asyncio",
    "anyio",
    "routerd.upstream",
    "routerd.fronts",
    "routerd.dispatch",
    "routerd.daemon",
    "routerd_client",
)
# The adapters own every HTTP detail of a provider; the rest of the daemon does not parse it.
HTTPX_USERS = (
    "routerd.upstream",
    "routerd.build",
    "routerd.daemon",
    "routerd.demo",
    "routerd.mock",
)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int


def _modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            text = path.read_text()
            found[name] = Module(name, path, ast.parse(text), text.count("\n"))
    return found


MODULES = _modules()


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(module: Module) -> set[str]:
    """Every module ``module`` imports (at any depth of its code, TYPE_CHECKING aside)."""
    parents = {
        child: node for node in ast.walk(module.tree) for child in ast.iter_child_nodes(node)
    }
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(module.tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from routerd.core import routing" imports the module routerd.core.routing; a
            # package itself counts only where a name is taken from it.
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(base)
    return names


GRAPH = {name: {i for i in _imports(m) if i in MODULES} for name, m in MODULES.items()}
EXTERNAL = {name: _imports(m) for name, m in MODULES.items()}


def _reach(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


CORE = sorted(name for name in MODULES if _matches(name, ("routerd.core",)))


def test_the_layout_has_a_core() -> None:
    expected = {"routing", "plan", "credential", "breaker", "limits", "tokens", "calls", "errors"}
    assert expected <= {name.rpartition(".")[2] for name in CORE}


@pytest.mark.parametrize("name", CORE)
def test_the_core_reaches_no_io_no_front_and_no_wire_protocol(name: str) -> None:
    reached = _reach(name) | {name}
    imported = set().union(*(EXTERNAL[m] for m in reached))
    crossing = sorted(i for i in imported if _matches(i, CORE_FORBIDDEN))
    assert crossing == [], f"{name} reaches {crossing}"


def test_only_the_adapters_and_the_daemon_that_builds_them_import_httpx() -> None:
    users = sorted(n for n, imported in EXTERNAL.items() if "httpx" in imported)
    assert [n for n in users if not _matches(n, HTTPX_USERS)] == []


def test_llhttp_parses_only_in_the_upstream_client_and_the_http_fronts_server() -> None:
    users = sorted(n for n, imported in EXTERNAL.items() if "httptools" in imported)
    server = "routerd.fronts.http.server"
    assert server in users
    assert all(n.startswith("routerd.upstream.") or n == server for n in users), users


def test_the_http_front_serves_without_uvicorn() -> None:
    users = sorted(n for n, imported in EXTERNAL.items() if "uvicorn" in imported)
    assert users and all(n.startswith("routerd.mock.") for n in users), users


def test_only_the_fleet_backend_imports_redis_and_only_connect_fleet_imports_it() -> None:
    # Loading redis-py costs ~110 modules and ~7 MB: a daemon without [state] skips it
    # (tests/test_lean_start.py runs it).
    users = sorted(
        n for n, imported in EXTERNAL.items() if any(_matches(i, ("redis",)) for i in imported)
    )
    assert users == ["routerd.fleet.backend"]
    importers = sorted(n for n, imported in GRAPH.items() if "routerd.fleet.backend" in imported)
    assert importers == ["routerd.fleet.setup"]


def test_the_dispatcher_does_not_load_the_adapters() -> None:
    reached = _reach("routerd.dispatch.dispatcher")
    assert not {"routerd.upstream.openai", "routerd.upstream.anthropic"} & reached
    assert not any(_matches(n, ("routerd.fronts",)) for n in reached)


def test_there_is_no_import_cycle() -> None:
    cycles = sorted(name for name in GRAPH if name in _reach(name))
    assert cycles == [], f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize(
    "name", sorted(n for n, m in MODULES.items() if m.path.name == "__init__.py")
)
def test_package_faces_only_hand_names_on(name: str) -> None:
    allowed = (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)
    for node in MODULES[name].tree.body:
        assert isinstance(node, allowed), f"{name}: {ast.unparse(node)[:60]}"
        if isinstance(node, ast.Assign):
            assert [ast.unparse(t) for t in node.targets] in (["__all__"], ["__version__"]), name
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant), name  # the docstring


def test_no_module_outgrows_what_one_reading_holds() -> None:
    big = {n: m.lines for n, m in MODULES.items() if m.lines > MAX_MODULE_LINES}
    assert big == {}


def test_no_function_outgrows_one_screen() -> None:
    long: dict[str, int] = {}
    for name, module in MODULES.items():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = length
    assert long == {}
