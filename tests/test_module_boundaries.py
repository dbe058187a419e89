"""kernels/ stands on its own, and no modules of engine/ or kernels/ import each other in a circle."""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.schedule import NoiseSchedule
from kernels.schedule_tables import cosine_betas, linear_betas, schedule_tables

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")



def module_files(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package`."""
    files = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    return files


def imported_names(path: Path) -> set[str]:
    """Every module name an import in the file could load, at the top or inside a function; imports only for
    type checkers (`if TYPE_CHECKING:`) load nothing and are left out."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import of {node.module}; the check reads absolute ones"
            names.add(node.module)  # `from a import b`: b may be a submodule or a name in a
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    files = {name: path for package in PACKAGES for name, path in module_files(package).items()}
    return {name: (imported_names(path) & set(files)) - {name} for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The import circles, one per group of modules that reach each other (Tarjan's strongly connected
    components), each as its sorted module names."""
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    found = set()

    def visit(module: str) -> None:
        index[module] = lowest[module] = len(index)
        stack.append(module)
        for imported in sorted(graph[module]):
            if imported not in index:
                visit(imported)
                lowest[module] = min(lowest[module], lowest[imported])
            elif imported in stack:
                lowest[module] = min(lowest[module], index[imported])
        if lowest[module] == index[module]:
            group = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(group) > 1:
                found.add(tuple(sorted(group)))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_modules_of_engine_or_kernels_import_each_other_in_a_circle():
    found = circles(import_graph())
    assert found == set(), "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == {("a", "b", "c")}


def test_importing_every_kernels_module_imports_nothing_from_engine():
    modules = sorted(module_files("kernels"))
    script = ("import importlib, sys\n"
              f"for module in {modules!r}:\n"
              "    importlib.import_module(module)\n"
              "print(' '.join(sorted(m for m in sys.modules if m == 'engine' or m.startswith('engine.'))))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr
    assert "kernels.check" in modules and "kernels.ahead_of_time" in modules  # the list is the whole package
    assert result.stdout.strip() == "", f"importing kernels/ imported engine modules: {result.stdout.strip()}"


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_the_checks_schedule_tables_equal_engine_schedules(name):
    tables = schedule_tables(linear_betas(1000) if name == "linear" else cosine_betas(1000))
    schedule = NoiseSchedule.create(name, 1000)
    for field in dataclasses.fields(tables):
        torch.testing.assert_close(getattr(tables, field.name), getattr(schedule, field.name), rtol=1e-12, atol=0,
                                   msg=lambda message: f"{field.name}: {message}")
