"""The pack's import graph, read from the source with `ast` (no import is executed).

Used by tests/unit/test_architecture.py and scripts/import_graph.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIST_NAME = "comfyui_ip2p"
TOOLS = ("testing", "tests", "bench", "scripts")
# The product's layers, lowest first; a package may import only packages of a lower layer or its own.
LAYERS = {
    "algorithms": 0, "dataset": 0, "training": 0,  # pure math and data: no ComfyUI import
    "pipeline": 1,  # ComfyUI-bound work, one module per concept
    "nodes": 2,
    "": 3, "cli": 3,  # the root __init__ that registers the nodes with ComfyUI, and the commands
}
# Top-level modules of a ComfyUI runtime: the pure layer must import none of them.
COMFY_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server",
                 "execution", "node_helpers", "latent_preview", "main", "app", "utils"}
SKIP_DIRS = {".runtime", ".git", "web", "docs", "example_workflows", "test-artifacts", "__pycache__"}


@dataclass(frozen=True)
class Import:
    source: Path  # the importing file, relative to ROOT
    target: str  # dotted module name inside the pack ("pipeline.edit"), or an outside name ("comfy.samplers")
    internal: bool
    line: int


def top_level(path: Path) -> str:
    """The top-level package of a file relative to ROOT ("" for the root __init__.py)."""
    return path.parts[0] if len(path.parts) > 1 else ""


def python_files(root: Path = ROOT) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts):
            yield rel


def _module_parts(rel: Path) -> list[str]:
    parts = list(rel.with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _package_parts(rel: Path) -> list[str]:
    parts = list(rel.with_suffix("").parts)
    return parts[:-1]


def _resolve_relative(rel: Path, level: int, module: str | None) -> str:
    base = _package_parts(rel)
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, *(module.split(".") if module else [])])


def _internal_name(name: str) -> str | None:
    # Bare names are outside the pack: `import nodes` is ComfyUI's nodes module, not ours.
    if name == DIST_NAME or name.startswith(DIST_NAME + "."):
        return name[len(DIST_NAME) + 1 :]
    return None


def imports_of(rel: Path, root: Path = ROOT) -> Iterator[Import]:
    """Every import statement in a file, function-level ones included."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _classify(rel, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = _resolve_relative(rel, node.level, node.module)
                names = [a.name for a in node.names]
                # `from . import x` names a module when x is one; keep the package otherwise.
                for name in names if not node.module else [None]:
                    full = f"{target}.{name}" if name and target else (name or target)
                    yield Import(rel, full, True, node.lineno)
            elif node.module:
                yield _classify(rel, node.module, node.lineno)


def _classify(rel: Path, name: str, line: int) -> Import:
    internal = _internal_name(name)
    if internal is not None:
        return Import(rel, internal, True, line)
    return Import(rel, name, False, line)


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Edges between top-level packages ("" = the root __init__.py): who imports whom."""
    graph: dict[str, set[str]] = {}
    for rel in python_files(root):
        src = top_level(rel)
        graph.setdefault(src, set())
        for imp in imports_of(rel, root):
            if not imp.internal:
                continue
            dst = imp.target.split(".")[0]
            if dst and dst != src:
                graph[src].add(dst)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Pairs (a, b) where a reaches b and b reaches a (each pair once)."""
    reach = {node: _reachable(graph, node) for node in graph}
    found = set()
    for a in graph:
        for b in reach[a]:
            if a < b and a in reach.get(b, set()):
                found.add((a, b))
    return sorted(found)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def format_graph(graph: dict[str, set[str]]) -> str:
    lines = []
    for src in sorted(graph):
        name = src or "(root __init__)"
        lines.append(f"{name} -> {', '.join(sorted(graph[src])) or '(nothing)'}")
    return "\n".join(lines)


def layering_faults(root: Path = ROOT) -> list[str]:
    """Every product import that points up a layer, into a tool, or (from the pure layer) into ComfyUI."""
    faults = []
    for rel in python_files(root):
        src = top_level(rel)
        if src not in LAYERS:
            continue
        for imp in imports_of(rel, root):
            where = f"{rel.as_posix()}:{imp.line} imports {imp.target}"
            head = imp.target.split(".")[0]
            if imp.internal and head in TOOLS:
                faults.append(f"{where}: product code never imports a tool ({head}/)")
            elif imp.internal and head in LAYERS and head != src and LAYERS[head] >= LAYERS[src] and LAYERS[src] > 0:
                faults.append(f"{where}: {head}/ is not below {src or 'the root'}/")
            elif imp.internal and LAYERS[src] == 0 and head in LAYERS and LAYERS[head] > 0:
                faults.append(f"{where}: the pure layer imports ComfyUI-bound code")
            elif not imp.internal and LAYERS[src] == 0 and head in COMFY_MODULES:
                faults.append(f"{where}: the pure layer imports ComfyUI")
    return faults
