"""The house's floors, checked from the source: no import cycle inside `raybpo/` (imports inside functions
count; only `if TYPE_CHECKING:` blocks are exempt), the stage graph never reaching raybpo.tune nor the metrics
Ray, and no function over 80 lines or module over 450 lines unless its docstring has a line starting
"Kept whole:" that says why."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "raybpo"
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 450
KEPT_WHOLE = "Kept whole:"


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


def imported(name: str, tree: ast.Module, known: set[str], *, every: bool = False) -> set[str]:
    """The raybpo modules that module `name` imports anywhere (a `from a import b` of a submodule is `a.b`);
    with `every`, the other modules it imports too (as written: `ray.data`, `numpy`)."""
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
    return {m for m in found if (every or m in known) and m != name}


def reachable(start: str, trees: dict[str, ast.Module]) -> set[str]:
    """Every module `start` imports, directly or through raybpo modules, anywhere in their code (imports inside
    functions too: what any call could import), itself included."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            if name in trees:
                todo.extend(imported(name, trees[name], set(trees), every=True))
    return seen


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


def kept_whole(node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the module's or function's docstring has a line starting "Kept whole:" (the reason it is long)."""
    doc = ast.get_docstring(node)
    return doc is not None and any(line.strip().startswith(KEPT_WHOLE) for line in doc.splitlines())


def too_long(name: str, source: str) -> list[str]:
    """The module (over MAX_MODULE_LINES lines) and its functions (over MAX_FUNCTION_LINES, `def` to the end)
    that are long without a "Kept whole:" reason, as `name[.function]: lines`."""
    tree = ast.parse(source)
    lines = len(source.splitlines())
    found = [f"{name}: {lines} lines"] if lines > MAX_MODULE_LINES and not kept_whole(tree) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not kept_whole(node):
                found.append(f"{name}.{node.name}: {length} lines")
    return found


def test_the_length_check_sees_a_long_function_and_module_and_takes_a_reason():
    body = "".join(f"    x{i} = {i}\n" for i in range(80))
    long_function = f"def run():\n{body}"  # 81 lines from `def` to its end
    assert too_long("raybpo.a", long_function) == ["raybpo.a.run: 81 lines"]
    assert too_long("raybpo.a", f"def run():\n{body[: body.rindex('    x79')]}") == []  # 80 lines
    nested = f"def outer():\n    def inner():\n    {body.replace(chr(10), chr(10) + '    ')}\n    return inner\n"
    assert too_long("raybpo.a", nested) == ["raybpo.a.outer: 84 lines", "raybpo.a.inner: 81 lines"]
    reason = f'def run():\n    """Run.\n\n    Kept whole: one table of steps.\n    """\n{body}'
    assert too_long("raybpo.a", reason) == []
    assert too_long("raybpo.a", f'def run():\n    """Keeps whole: no."""\n{body}') == ["raybpo.a.run: 82 lines"]
    module = "".join(f"x{i} = {i}\n" for i in range(451))
    assert too_long("raybpo.b", module) == ["raybpo.b: 451 lines"]
    assert too_long("raybpo.b", f'"""B.\n\nKept whole: one list."""\n{module}') == []


def test_raybpo_has_no_long_function_or_module_without_a_reason():
    found = [entry for p in sorted(PACKAGE.rglob("*.py")) for entry in too_long(module_name(p), p.read_text())]
    assert found == []


def test_the_stage_graph_never_imports_tune_and_the_metrics_never_import_ray():
    """No stage reaches raybpo.tune (Tune's hook is passed down to `fit`), and the reward-model metrics and win
    rates are plain functions that import no Ray, whatever function of theirs is called."""
    trees = modules()
    assert "raybpo.train.loop" in reachable("raybpo.graph", trees)  # the walk follows the real imports
    assert not [m for m in reachable("raybpo.graph", trees) if m.startswith("raybpo.tune")]
    for metrics in ("raybpo.metrics.reward", "raybpo.metrics.winrates"):
        assert "numpy" in reachable(metrics, trees)
        assert not [m for m in reachable(metrics, trees) if m == "ray" or m.startswith("ray.")], metrics
