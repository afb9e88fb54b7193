"""The shape of the package: no import cycle between its modules, no oversized module, a CLI that starts.

The import graph is read from the source with :mod:`ast`, not by importing: every ``import`` and ``from ...
import`` statement counts, at module level or inside a function or an ``if TYPE_CHECKING:`` block; relative
imports are resolved, and ``from automedseg import x`` counts as importing ``automedseg.x`` when ``x`` is a
submodule.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = "automedseg"
REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / PACKAGE
MAX_LINES = 600


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the package (``__init__`` is the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: Iterable[str]) -> str | None:
    """``name`` or its longest prefix that is a module of the package (``a.b.func`` -> ``a.b``)."""
    known = set(modules)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imported_modules(module: str, source: str, modules: Iterable[str], *, is_package: bool = False) -> set[str]:
    """The package-internal modules that the statements of ``source`` (the text of ``module``) import.

    Args:
        module: Dotted name of the importing module.
        source: Its source text.
        modules: Dotted names of every module of the package.
        is_package: ``module`` is a package's ``__init__`` (relative imports start from the package itself).
    """
    modules = set(modules)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{origin}.{alias.name}" in modules:
                    found.add(f"{origin}.{alias.name}")
                elif (target := _known(origin, modules)) is not None:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = module_files(package_dir)
    return {m: imported_modules(m, p.read_text(encoding="utf-8"), files, is_package=p.name == "__init__.py")
            for m, p in files.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


# --- the helpers themselves -------------------------------------------------------------------------------


def test_imports_are_collected_everywhere_and_resolved() -> None:
    modules = ["pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.sub", "pkg.sub.f"]
    source = (
        "import os\n"
        "from pkg import a\n"  # a submodule
        "from pkg.b import thing\n"
        "from . import c\n"  # relative, a submodule
        "def late():\n"
        "    from .d import other\n"  # inside a function
        "if False:\n"
        "    import pkg.sub.f\n"
        "from pkg import __version__\n"  # the package itself
    )
    assert imported_modules("pkg.e", source, modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub.f"}
    assert imported_modules("pkg.sub.f", "from .. import e\nfrom ..a import x\n", modules) == {"pkg.e", "pkg.a"}
    assert imported_modules("pkg.sub", "from . import f\n", modules, is_package=True) == {"pkg.sub.f"}


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b2", "c"}, "b2": set(), "c": {"b"}}) == ["b", "c", "b"]


# --- the package ------------------------------------------------------------------------------------------


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "automedseg.cli" in graph
    assert "automedseg.dicom" in graph["automedseg.images"]  # the graph is not empty by mistake
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_module_is_oversized(module: str) -> None:
    lines = len(module_files()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (at most {MAX_LINES}); split it along a seam"


def test_the_cli_starts() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", PACKAGE, "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and "train" in done.stdout
