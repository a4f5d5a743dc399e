"""The house plan's import rules (docs/design.md), checked on the source: who may import whom.

Every `import` / `from ... import` in a package's files counts, wherever it stands (module level,
inside a function, under `if TYPE_CHECKING:`): a rule that a lazy import can dodge is no rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the Kiln packages it may import (itself always). Layers, top to bottom:
#   orchestrator | rollout, trainer, envs | inference_engine | weight_sync | kiln_common
ALLOWED: dict[str, set[str]] = {
    "orchestrator": {"rollout", "trainer", "envs", "inference_engine", "weight_sync", "kiln_common"},
    "rollout": {"kiln_common"},
    "trainer": {"weight_sync", "kiln_common"},
    "envs": {"rollout", "kiln_common"},
    "inference_engine": {"weight_sync", "kiln_common"},
    "weight_sync": {"kiln_common"},
    "kiln_common": set(),
}
# envs plugs into the rollout's contract for generate functions, and nothing else of it
ENVS_MAY_USE_FROM_ROLLOUT = {"rollout.client", "rollout.config", "rollout.generate"}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            package = path.relative_to(ROOT).parts[:-1]
            base = ".".join(package[:len(package) - node.level + 1])
            out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
    return out


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> {imported Kiln package: ['file:line module', ...]}."""
    graph: dict[str, dict[str, list[str]]] = {p: {} for p in ALLOWED}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module in imports_of(path):
                top = module.split(".")[0]
                if top in ALLOWED and top != package:
                    where = f"{path.relative_to(ROOT)}:{line} {module}"
                    graph[package].setdefault(top, []).append(where)
    return graph


def test_every_top_level_package_has_a_rule():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"examples", "tests", "benchmarks"}
    assert packages == set(ALLOWED), f"packages without an import rule: {sorted(packages - set(ALLOWED))}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package):
    forbidden = {dep: where for dep, where in package_graph()[package].items() if dep not in ALLOWED[package]}
    assert not forbidden, f"{package} may import only {sorted(ALLOWED[package])}; found {forbidden}"


def test_envs_uses_only_the_rollout_contract():
    found = package_graph()["envs"].get("rollout", [])
    bad = [w for w in found if w.split()[-1] not in ENVS_MAY_USE_FROM_ROLLOUT]
    assert not bad, f"envs may import only {sorted(ENVS_MAY_USE_FROM_ROLLOUT)} of rollout; found {bad}"


def test_no_import_loop_between_packages():
    graph = {p: set(deps) for p, deps in package_graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail(f"import loop: {' -> '.join(trail + [node, dep])}")
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for package in sorted(graph):
        if package not in state:
            visit(package, [])


def test_the_checker_sees_a_lazy_forbidden_import(tmp_path):
    """A function-level import is found too (the rule cannot be dodged by moving an import inward)."""
    pkg = tmp_path / "weight_sync"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text("def f():\n    from inference_engine import Engine\n    return Engine\n")
    assert imports_of(pkg / "m.py") == [(2, "inference_engine")]
