"""The layout the design promises: the library below the programs, no import circles, the programs installed as
`diffalign.pipelines` (never a top-level `pipelines`), and pyproject's package list equal to the folders."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "diffalign"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIBRARY.rglob("*.py"))}


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every diffalign module `path` imports, at the top or inside a function (a lazy import is an edge too)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package, up level - 1
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [base] + [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        else:
            continue
        out.update(n for n in names if n in modules or n.startswith(("pipelines", "diffalign.pipelines")))
    return out


def test_the_library_never_imports_the_programs():
    modules = library_modules()
    bad = {
        name: sorted(m for m in imported(p, modules) if m.startswith(("pipelines", "diffalign.pipelines")))
        for name, p in modules.items()
        if name != "diffalign.__main__"  # `python -m diffalign` is the command, like the console script
    }
    assert not {k: v for k, v in bad.items() if v}


def test_no_import_circle_in_the_library():
    modules = library_modules()
    graph = {name: imported(p, modules) - {name} for name, p in modules.items()}
    # a package's __init__ may re-export its submodules; a submodule importing its own package back is the circle
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles


def test_pyproject_lists_every_package_and_maps_the_programs():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p) for p in LIBRARY.rglob("__init__.py")}
    assert set(tool["packages"]) == folders | {"diffalign.pipelines"}
    assert tool["package-dir"] == {"diffalign.pipelines": "pipelines"}
    assert (ROOT / "pipelines" / "__init__.py").is_file()


def test_installed_as_diffalign_pipelines_not_pipelines(tmp_path):
    """Outside the checkout (no cwd on the path), the programs import as diffalign.pipelines only."""
    code = (
        "import importlib.util, diffalign.pipelines.cli as c; "
        "assert importlib.util.find_spec('pipelines') is None, 'a top-level pipelines package is installed'; "
        "print(c.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "diffalign.pipelines.cli"
