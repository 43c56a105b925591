"""The package layers of docs/architecture.md, kept true: which part of the tree may import which.

Static rules read every ``import`` in the source (``ast``: module level and inside functions alike,
relative imports resolved). Runtime rules import a service's entry module in a fresh interpreter and
look at ``sys.modules``: what a deployable loads whatever path pulls it in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE_ENTRY_POINTS = ("services.prefill_worker", "services.decode_worker", "services.mixed_worker")
PROTOBUF = ("pdmesh.v1", "google.protobuf", "grpc")
# Each service's main module; a role entry point stands for the worker (it runs services.worker).
SERVICE_MAINS = ("services.controller.main", "services.coordinator.main", "services.prefill_worker.__main__")
BENCH_ONLY = ("transformers", "matplotlib")  # the [bench] extra: no service may load them


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported, and whether inside a function."""

    importer: str
    target: str
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        return f"{self.importer}:{self.line} imports {self.target} ({where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names (``from . import x`` inside ``a.b`` -> ``a.b``)."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = _resolve(node, importer, is_package)
    # ``from pdmesh import v1`` imports the module pdmesh.v1: count both names
    return [module, *(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")]


def imports_of(path: Path) -> list[Import]:
    importer, is_package = module_name(path), path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.extend(
                    Import(importer, t, child.lineno, in_function)
                    for t in _targets(child, importer, is_package)
                )
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def source_imports(package: str) -> list[Import]:
    """Every import in the ``.py`` files under ``package`` (a top-level folder or a subpackage)."""
    folder = ROOT.joinpath(*package.split("."))
    files = sorted(p for p in folder.rglob("*.py") if "v1" not in p.relative_to(ROOT).parts[:2])
    return [imp for path in files for imp in imports_of(path)]


def names(target: str, prefixes: tuple[str, ...]) -> bool:
    """True when ``target`` is one of ``prefixes`` or inside one of them."""
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def service_of(module: str) -> str | None:
    """``services.X`` for a module of service X (``services`` itself: None)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "services" and len(parts) > 1 else None


def test_the_rules_see_imports_in_functions_and_relative_ones(tmp_path: Path) -> None:
    """The checker itself: a lazy import and a relative one are both found and resolved."""
    found = imports_of(ROOT / "tests" / "unit" / "test_layers.py")
    assert any(i.target == "ast" and not i.in_function for i in found)
    probe = ast.parse("from ..kv import registry\n").body[0]
    assert _targets(probe, "pdmesh.engine.engine", False) == ["pdmesh.kv", "pdmesh.kv.registry"]
    assert _targets(probe, "pdmesh.engine", True) == ["pdmesh.kv", "pdmesh.kv.registry"]


def test_services_never_import_each_other() -> None:
    """A service is one deployable; the three role entry points only start the worker."""
    broken = []
    for imp in source_imports("services"):
        own, other = service_of(imp.importer), service_of(imp.target)
        if other is None or other == own:
            continue
        if own in ROLE_ENTRY_POINTS and other == "services.worker":
            continue
        broken.append(str(imp))
    assert broken == [], "\n".join(broken)


def test_the_library_never_imports_a_service_at_module_level() -> None:
    """pdmesh/ is the library the services are built from; where it starts one (the CLI) it imports
    the service inside the function that does."""
    broken = [
        str(i) for i in source_imports("pdmesh") if names(i.target, ("services",)) and not i.in_function
    ]
    assert broken == [], "\n".join(broken)


def test_the_engine_never_imports_protobuf_grpc_or_a_service() -> None:
    """The engine takes and gives plain Python types; the worker service translates the wire."""
    broken = [str(i) for i in source_imports("pdmesh.engine") if names(i.target, (*PROTOBUF, "services"))]
    assert broken == [], "\n".join(broken)


def test_the_coordinator_never_names_the_engine() -> None:
    """Request types both sides use live in pdmesh.generation; the coordinator never reaches into
    pdmesh.engine (which would also pull torch into it)."""
    broken = [str(i) for i in source_imports("services.coordinator") if names(i.target, ("pdmesh.engine",))]
    assert broken == [], "\n".join(broken)


def loaded_after_import(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has in sys.modules after importing ``module``."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps([m for m in {list(watched)!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, f"importing {module} failed:\n{done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", ["services.controller.main", "services.coordinator.main"])
def test_the_coordinator_and_controller_never_load_torch(module: str) -> None:
    assert loaded_after_import(module, ("torch",)) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("module", SERVICE_MAINS)
def test_no_service_loads_the_bench_extras(module: str) -> None:
    """transformers and matplotlib serve the benchmarks and reference checks (the [bench] extra): a
    service image has neither."""
    assert loaded_after_import(module, BENCH_ONLY) == []
