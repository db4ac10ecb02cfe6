"""The import graph of lima_jax/ has no cycle, imports inside functions included, and nothing in
lima_jax imports launch/ (DESIGN.md's layers). Read from the source with `ast`, so a cycle hidden
by a function-level import is found without running it."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lima_jax"


def module_names() -> dict[str, pathlib.Path]:
    """'lima_jax.model.lora' -> its file, for every module of the package ('lima_jax.model' is its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """The lima_jax modules `name` imports anywhere in its file (top level, functions, classes);
    `from x import y` is an import of x.y when y is a module, else of x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules or t.startswith("launch"))
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_function_level_imports_and_cycles():
    assert "lima_jax.model.transformer" in import_graph()["lima_jax.model.lora"]  # imported inside functions
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lima_jax_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_in_lima_jax_imports_launch():
    users = {name: sorted(t for t in targets if t.startswith("launch")) for name, targets in import_graph().items()}
    assert not {k: v for k, v in users.items() if v}
