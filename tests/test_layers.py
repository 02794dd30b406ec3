"""The layers, checked on the source: each package imports only the layers before it, methods never
import Ray, torch.distributed or another method, and the engine never reaches into a method."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xmodal"
# layer -> the xmodal packages it may import (itself included). Order: data -> models -> losses ->
# methods -> figures -> engine -> tune -> report -> bench -> predict -> cli.
ALLOWED = {
    "data": {"data"},
    "models": {"models"},
    "losses": {"losses"},
    "methods": {"data", "models", "losses", "methods"},
    "figures": {"methods"},
    "engine": {"data", "models", "losses", "methods", "figures", "engine"},
    "tune": {"data", "models", "methods", "engine", "tune", "report"},
    "report": {"methods", "figures", "engine", "tune", "report"},
    "bench": {"data", "models", "methods", "engine", "bench"},
    "predict": {"data", "models", "losses", "methods", "engine", "predict"},
    "cli": {"data", "models", "methods", "engine", "tune", "report", "bench", "predict", "cli"},
}
SHARED = {"errors", "settings", "progress"}  # leaf modules every layer may use
METHOD_PLUMBING = {"base", "registry", "optim", "exports", "inputs", "metrics", "panels", "summaries"}
RAY_FREE = {"data", "models", "losses", "methods", "figures", "report"}


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module imported by a file (top level and inside functions), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(p) in ALLOWED)


# The data layer's Ray side: the Ray Data pipeline and its fix to Ray Data itself.
RAY_DATA_SIDE = {"pipeline.py", "ray_fixes.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_earlier_layers(path: Path):
    layer = layer_of(path)
    problems = []
    for module, line in imports(path):
        parts = module.split(".")
        if parts[0] == "xmodal" and len(parts) > 1:
            target = parts[1]
            if target not in ALLOWED[layer] | SHARED:
                problems.append(f"line {line}: {layer} imports {module}")
            if layer == "engine" and target == "methods" and len(parts) > 2 and parts[2] not in METHOD_PLUMBING:
                problems.append(f"line {line}: the engine reaches into method {module}")
        if layer in RAY_FREE and (parts[0] == "ray" or module.startswith("torch.distributed")):
            if not (layer == "data" and path.name in RAY_DATA_SIDE and parts[0] == "ray"):
                problems.append(f"line {line}: {layer} imports {module}")
    assert not problems, problems


METHOD_PACKAGES = sorted(p for p in (PACKAGE / "methods").iterdir() if p.is_dir() and (p / "__init__.py").is_file())


@pytest.mark.parametrize("package", METHOD_PACKAGES, ids=lambda p: p.name)
def test_a_method_never_imports_another_method(package: Path):
    problems = []
    for path in package.rglob("*.py"):
        for module, line in imports(path):
            parts = module.split(".")
            if parts[:2] == ["xmodal", "methods"] and len(parts) > 2 and parts[2] not in METHOD_PLUMBING | {package.name}:
                problems.append(f"{path.name} line {line}: imports {module}")
    assert not problems, problems


def test_importing_a_method_imports_neither_ray_nor_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys, xmodal.methods.registry as r; r.load_methods(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'matplotlib')]; assert not bad, bad[:5]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
