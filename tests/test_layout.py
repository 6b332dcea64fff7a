"""The package layout (docs/architecture.md): model/ imports neither export/ nor runtime/, export/ and runtime/
never import each other, and no module imports another that imports it back, directly or through others.

Imports are read from the source with `ast` (every `import` / `from ... import` statement, also those inside
functions: a lazy import is still a dependency), relative imports resolved against the importing module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"model": ROOT / "model", "export": ROOT / "export", "runtime": ROOT / "runtime"}


def _modules() -> dict[str, Path]:
    """qwen_vl_trt.<pkg>.<sub>... -> source file, for every .py file of the three packages."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join(("qwen_vl_trt", pkg, *parts))] = path
    return out


def _imports(name: str, path: Path, known: set) -> set[str]:
    """The modules of `known` that `name` imports (a package import counts as its __init__)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def _room(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("room,forbidden", [("model", {"export", "runtime"}), ("export", {"runtime"}),
                                            ("runtime", {"export"})])
def test_rooms_import_only_what_they_may(room, forbidden):
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if _room(m) == room
                 for t in targets if _room(t) in forbidden)
    assert not bad, bad


def test_no_import_cycles():
    """Tarjan-free check: a module must not be reachable from any module it imports."""
    cycles = []
    for start in GRAPH:
        seen, stack = set(), list(GRAPH[start])
        while stack:
            m = stack.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                stack.extend(GRAPH.get(m, ()))
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_the_scan_sees_imports():
    """The scan itself: known edges of the tree are found (a scan that found nothing would pass vacuously)."""
    assert "qwen_vl_trt.model.spec" in GRAPH["qwen_vl_trt.export.cli"]
    assert "qwen_vl_trt.model.manifest" in GRAPH["qwen_vl_trt.runtime.generate"]
    assert "qwen_vl_trt.model.errors" in GRAPH["qwen_vl_trt.model.spec"]
