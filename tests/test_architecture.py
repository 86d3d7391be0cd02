"""The layer contracts in pyproject.toml hold, they catch a violating import, and no two
modules or packages import each other (docs/architecture.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_contracts_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture
def tree(tmp_path) -> Path:
    """The project's packages and its contracts, copied to change freely."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "module,line,contract",
    [
        ("verifier_svc/servicer.py", "import proposer_svc.servicer", "Layers point down"),  # service -> service
        ("runtime/kv_cache.py", "import verifier_svc.server", "Layers point down"),  # core -> service
        ("protocol/generation.py", "import smartspec.cli", "Layers point down"),  # protocol -> CLI
        ("engine/engine.py", "import drafting.local", "Layers point down"),  # two cores of one level
        ("controller/goodput.py", "import grpc", "The cores speak no gRPC"),
        ("runtime/sampler.py", "import grpc", "The cores speak no gRPC"),
    ],
)
def test_a_violating_import_breaks_a_contract(tree, module, line, contract):
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken) or contract in result.stdout.split("Broken contracts")[-1]


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one member: each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.add(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_between_modules_or_packages():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in graph.modules if m.split(".")[0] in PACKAGES}
    edges = {m: {o for o in graph.find_modules_directly_imported_by(m) if o in modules} for m in modules}
    assert strongly_connected(modules, edges) == []

    def package(module: str) -> str:  # a module's package: its parent, or itself for a package's __init__
        return module if graph.find_children(module) else module.rpartition(".")[0] or module

    packages = {package(m) for m in modules}
    package_edges: dict[str, set[str]] = {}
    for m, imported in edges.items():
        package_edges.setdefault(package(m), set()).update(package(o) for o in imported if package(o) != package(m))
    assert strongly_connected(packages, package_edges) == []
    assert strongly_connected({"a", "b", "c"}, {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [{"a", "b", "c"}]


def test_no_source_file_is_longer_than_a_few_hundred_lines():
    sources = [
        p
        for package in PACKAGES + ["benchmarks", "scripts"]
        for p in (ROOT / package).rglob("*.py")
        if "protocol/v1" not in p.as_posix()
    ]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 320}
    assert not long, long
