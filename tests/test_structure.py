"""The house's floors, checked from the source: no import cycle inside `raybpo/` (imports inside functions
count; only `if TYPE_CHECKING:` blocks are exempt)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "raybpo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The raybpo modules that module `name` imports anywhere (a `from a import b` of a submodule is `a.b`)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if name in known and any(k.startswith(name + ".") for k in known) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_a_cycle_through_an_import_inside_a_function():
    a = ast.parse("def f():\n    from raybpo.b import g\n")
    b = ast.parse("from raybpo import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import raybpo.c\n")
    known = {"raybpo", "raybpo.a", "raybpo.b", "raybpo.c"}
    graph = {"raybpo.a": imported("raybpo.a", a, known), "raybpo.b": imported("raybpo.b", b, known)}
    assert graph == {"raybpo.a": {"raybpo.b"}, "raybpo.b": {"raybpo.a"}}
    assert cycles(graph) == [["raybpo.a", "raybpo.b"]]


def test_raybpo_has_no_import_cycle():
    trees = modules()
    graph = {name: imported(name, tree, set(trees)) for name, tree in trees.items()}
    assert sum(map(len, graph.values())) > 50  # the checker reads the real imports
    assert cycles(graph) == []
