"""The shape the code keeps (issue: one training session): small functions where training is driven, no import
cycle, heavy imports at the top where a module needs them anyway, and no `print` in library layers."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tltoolkit"
DRIVING = ("stages", "commands", "tuning")  # Where training is driven: kept in small pieces.
MAX_LINES, MAX_PARAMS = 60, 8
# The public `tltoolkit.tune` mirrors the CLI's flags one to one (distribution already grouped in `Distributed`).
WIDER = {"commands/tune.py:tune": 10}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def code_lines(node) -> int:
    """Lines of a function, its docstring left out."""
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    return node.end_lineno - body[0].lineno + 1 + (body[0].lineno - node.lineno if body is node.body else 1)


def test_functions_that_drive_training_are_small():
    too_big = []
    for path, tree in modules():
        if path.parent.name not in DRIVING:
            continue
        for node in functions(tree):
            args = node.args
            params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
            where = f"{path.parent.name}/{path.name}:{node.name}"
            if code_lines(node) > MAX_LINES or len(params) > WIDER.get(where, MAX_PARAMS):
                too_big.append(f"{where}: {code_lines(node)} lines, {len(params)} parameters")
    assert not too_big, "split these (at most ~60 lines and ~8 parameters):\n" + "\n".join(too_big)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree):
    """Every node but those under `if TYPE_CHECKING:` (imports for type hints never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _imports(tree, known: set[str]) -> set[str]:
    """The tltoolkit modules a module imports when it runs (at the top or inside functions)."""
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tltoolkit"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tltoolkit"))
    return found


def test_no_import_cycle():
    trees = {_module_name(path): tree for path, tree in modules()}
    graph = {name: _imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    cycles, state = [], {}

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if name.startswith(target + "."):
                continue  # A module importing its own package's __init__ (the package is already loading).
            if state.get(target) == "open":
                cycles.append(" -> ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("heavy", ["keras", "tensorflow", "mlflow"])
def test_a_module_that_imports_a_heavy_library_at_the_top_does_not_import_it_again_inside(heavy):
    hidden = []
    for path, tree in modules():
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        if heavy not in top:
            continue
        for node in functions(tree):
            for inner in ast.walk(node):
                names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    names = [inner.module]
                if any(name.split(".")[0] == heavy for name in names):
                    hidden.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert not hidden, f"{heavy} is imported at the top already; these imports inside functions hide nothing:\n" + (
        "\n".join(hidden)
    )


def test_library_layers_log_instead_of_printing():
    """Only the CLI decides what reaches the terminal (`tltoolkit.run(..., verbose=0)` prints nothing)."""
    printing = []
    for path, tree in modules():
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not printing, "use logging.getLogger(__name__) instead of print:\n" + "\n".join(printing)


def test_stages_never_import_a_tracking_library():
    """Tracking plugs into the session through `TrainingHooks`; `stages/` knows nothing of MLflow."""
    found = []
    for path, tree in modules():
        if path.parent.name != "stages":
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "mlflow" or "tracking" in n]
    assert not found, found
