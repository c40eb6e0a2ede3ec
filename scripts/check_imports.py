"""Check the import rules of the code base; exit 1, listing every breach, when one is broken.

    python scripts/check_imports.py

1. No package, benchmark, app or test imports ``scripts/`` (scripts are command lines over the packages).
2. No import cycle among first-party modules, lazy (function-level) imports included.
3. No module imports another module's private name (``from m import _x``, or ``m._x`` on an imported module).
4. The core (``shared``) imports at module level only the standard library, torch, peft, safetensors and itself (but
   ``shared.integrations``, the transformers ``Trainer`` callback, which users import on purpose), and never a
   frontend (``tsd_common``, ``tsd_diffusion``, ``tsd_text``), not even lazily.

Tests may import the packages' private names (to test them); every other rule holds for them too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("shared", "tsd_common", "tsd_diffusion", "tsd_text", "benchmarks", "apps", "scripts", "tests")
CORE_ALLOWED = {"torch", "peft", "safetensors", "shared"}
INTEGRATIONS = {"shared.integrations"}  # core modules of a third-party integration, imported by users on purpose
FRONTENDS = ("tsd_common", "tsd_diffusion", "tsd_text")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module of a (possibly relative) ``from ... import``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, names taken from it, at module level?, line) for every import of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    module, is_package = module_name(path), path.name == "__init__.py"
    top = set(map(id, tree.body))
    type_checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
                     for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, is_package)
            if target == "__future__":
                continue
            out.append((target, [a.name for a in node.names], id(node) in top, node.lineno))
    return out


def first_party(name: str) -> bool:
    return name.split(".")[0] in FIRST_PARTY


def main() -> int:
    files = sorted(p for top in FIRST_PARTY for p in (ROOT / top).rglob("*.py") if (ROOT / top).is_dir())
    modules = {module_name(p): p for p in files}
    errors: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        where = path.relative_to(ROOT)
        for target, names, at_top, line in imports(path):
            head = target.split(".")[0]
            if head == "scripts" and not module.startswith("scripts"):
                errors.append(f"{where}:{line}: imports {target} (scripts/ is not importable code)")
            if module.split(".")[0] == "shared":
                if head in FRONTENDS:
                    errors.append(f"{where}:{line}: the core imports the frontend {target}")
                elif (at_top and module not in INTEGRATIONS and head not in CORE_ALLOWED
                      and head not in sys.stdlib_module_names):
                    errors.append(f"{where}:{line}: the core imports {target} at module level")
            if not first_party(target):
                continue
            # `from pkg import module` imports that module; otherwise the target module itself
            deps = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            graph[module].update(d for d in deps if d in modules and d != module)
            if not module.startswith("tests"):
                for n in names:
                    if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules:
                        errors.append(f"{where}:{line}: imports the private name {n} of {target}")
        if not module.startswith("tests"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            aliases = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                       for a in node.names if first_party(a.name)}
            aliases.update({a.asname or a.name: f"{resolve(module, node, path.name == '__init__.py')}.{a.name}"
                            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names
                            if f"{resolve(module, node, path.name == '__init__.py')}.{a.name}" in modules})
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                        and node.attr.startswith("_") and not node.attr.startswith("__")):
                    errors.append(f"{where}:{node.lineno}: uses the private name {node.attr} of "
                                  f"{aliases[node.value.id]}")
    errors += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for e in errors:
        print(e)
    print(f"check_imports: {len(modules)} modules, {sum(map(len, graph.values()))} first-party imports, "
          f"{len(errors)} problem(s)")
    return 1 if errors else 0


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    sys.exit(main())
