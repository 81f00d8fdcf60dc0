"""The shape rules of the code base, read from the source with ``ast`` (nothing is imported or run).

* no import cycle among the modules of ``pom_ha/`` and ``services/`` (imports inside functions and under
  ``TYPE_CHECKING`` count too: a cycle kept alive only for a type hint is still a knot for the reader);
* a service never imports another service (they talk through PostgreSQL, Kafka, ActiveMQ, the cache);
* no file under ``services/`` over 450 lines, no class under ``services/`` over 300 lines.

Each checker is also run on a small made-up tree that must make it fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pom_ha", "services")
MAX_FILE_LINES = 450
MAX_CLASS_LINES = 300


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(root, path)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or ``module.attribute``) names."""
    while name:
        if name in known:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def imports_of(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules that ``mod`` imports (``from package import module`` names the module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" for a in node.names]
        for target in targets:
            found = _resolve(target, known)
            if found is not None and found != mod:
                out.add(found)
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {mod: imports_of(mod, path, known) for mod, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def service_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def cross_service_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
        if service_of(mod) and service_of(dep) and service_of(mod) != service_of(dep)
    )


def oversized(root: Path, package: str = "services") -> list[str]:
    """Files over MAX_FILE_LINES lines and classes over MAX_CLASS_LINES lines under ``package``."""
    out: list[str] = []
    for path in sorted((root / package).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root)
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            out.append(f"{rel}: {n} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    out.append(f"{rel}: class {node.name} {size} lines (at most {MAX_CLASS_LINES})")
    return out


# ---- the rules on this repository ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_walk_sees_the_code_base(graph: dict[str, set[str]]) -> None:
    # a walk that found nothing would pass every rule
    assert len(graph) > 100
    assert "services.campaign_director.context" in graph["services.campaign_director.daemon"]
    assert "pom_ha.ha.term" in graph["pom_ha.ha.daemon"]


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_service_imports_another(graph: dict[str, set[str]]) -> None:
    assert cross_service_imports(graph) == []


def test_service_files_and_classes_are_small() -> None:
    assert oversized(ROOT) == []


# ---- the checkers fail where they must ---------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_a_cycle_is_found_even_behind_type_checking_and_relative_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pom_ha/__init__.py": "",
        "pom_ha/a.py": "from pom_ha import b\n",
        "pom_ha/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n",
        "pom_ha/c.py": "def f():\n    import pom_ha.a\n",
        "pom_ha/d.py": "from pom_ha.a import something\n",
        "services/__init__.py": "",
    })
    found = cycles(import_graph(root))
    assert found == [["pom_ha.a", "pom_ha.b", "pom_ha.c"]]


def test_no_cycle_in_a_tree_without_one(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pom_ha/__init__.py": "", "pom_ha/a.py": "from pom_ha import b\n", "pom_ha/b.py": "import os\n",
        "services/__init__.py": "",
    })
    assert cycles(import_graph(root)) == []


def test_a_service_importing_another_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pom_ha/__init__.py": "", "pom_ha/x.py": "",
        "services/__init__.py": "", "services/one/__init__.py": "", "services/two/__init__.py": "",
        "services/one/daemon.py": "from pom_ha import x\nfrom services.one import helper\n",
        "services/one/helper.py": "",
        "services/two/daemon.py": "from services.one.daemon import Thing\n",
    })
    assert cross_service_imports(import_graph(root)) == ["services.two.daemon -> services.one.daemon"]


def test_a_long_file_and_a_long_class_are_found(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    root = _tree(tmp_path, {
        "services/big.py": "class Big:\n" + body + "\n" + "\n".join("y = 1" for _ in range(200)) + "\n",
        "services/fine.py": "class Small:\n    pass\n",
    })
    found = oversized(root)
    assert found == [
        f"services/big.py: {1 + MAX_CLASS_LINES + 200} lines (at most {MAX_FILE_LINES})",
        f"services/big.py: class Big {1 + MAX_CLASS_LINES} lines (at most {MAX_CLASS_LINES})",
    ]
