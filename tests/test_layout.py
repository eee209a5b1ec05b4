"""The package layout's rules, read from the code's imports (imports inside functions included).

    cli/render/options -> api -> tasks -> train/scale -> runs -> pages -> analysis/features -> models
    -> data/strategy -> config/errors/files/progress/runtime

An import may point down the list or sideways within one layer; tasks never import tasks (a task's own
sub-package, tasks/tune/, is one task); and there is no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "finetune_cli"

#: Layers, top first: the first prefix a module starts with names its layer.
LAYERS = [
    ("finetune_cli.cli", "finetune_cli.render", "finetune_cli.options", "finetune_cli.__main__"),
    ("finetune_cli.api",),
    ("finetune_cli.tasks",),
    ("finetune_cli.train", "finetune_cli.scale"),
    ("finetune_cli.runs",),
    ("finetune_cli.pages",),
    ("finetune_cli.analysis", "finetune_cli.features"),
    ("finetune_cli.models",),
    ("finetune_cli.data", "finetune_cli.strategy", "finetune_cli.recipes"),
    ("finetune_cli.config", "finetune_cli.errors", "finetune_cli.files", "finetune_cli.progress",
     "finetune_cli.runtime", "finetune_cli"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (`from pkg import module` counts the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name in known and name.startswith("finetune_cli")}


def layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes if p != "finetune_cli") or name == prefixes[-1]:
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def task_of(name: str) -> str | None:
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) >= 3 and parts[1] == "tasks" else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) - {name} for name, path in known.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer(name)


def test_imports_point_down(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) < layer(a))
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_tasks_never_import_tasks(graph):
    crossing = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                      if task_of(a) and task_of(b) and task_of(a) != task_of(b))
    assert not crossing, "tasks importing other tasks:\n" + "\n".join(crossing)


def test_no_import_cycle(graph):
    """Depth-first search for a back edge; the message names one cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a task importing a task, and an engine module importing a task, are both seen."""
    assert task_of("finetune_cli.tasks.tune.space") == task_of("finetune_cli.tasks.tune.linear")
    assert task_of("finetune_cli.tasks.export") != task_of("finetune_cli.tasks.predict")
    assert layer("finetune_cli.train.engine") > layer("finetune_cli.tasks.train")
    assert layer("finetune_cli.config") > layer("finetune_cli.data.scan")
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from finetune_cli.tasks import predict\n")
    assert imports(source, {"finetune_cli.tasks", "finetune_cli.tasks.predict"}) == {
        "finetune_cli.tasks", "finetune_cli.tasks.predict"}


def test_api_names_each_task_function_and_restates_no_signature():
    """`api` holds no function of its own (only the lazy lookup): every public name is the task's function."""
    from finetune_cli import api

    defined = {n.name for n in ast.parse((PACKAGE / "api.py").read_text()).body if isinstance(n, ast.FunctionDef)}
    assert defined == {"__getattr__", "__dir__"}
    for name, module in api.EXPORTS.items():
        function = getattr(api, name)
        assert (function.__module__, function.__name__) == (f"finetune_cli.tasks.{module}", name)
    assert sorted(api.EXPORTS) == api.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        api.nope


def test_importing_the_cli_loads_no_heavy_library():
    """`finetune --help` stays light: the tasks (and TensorFlow, scikit-learn, pandas) load on first use."""
    import subprocess
    import sys

    code = ("import sys, finetune_cli.cli\n"
            "print([m for m in ('tensorflow', 'keras', 'sklearn', 'pandas', 'finetune_cli.tasks.train') "
            "if m in sys.modules])")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "[]"


def test_no_function_over_60_lines_and_no_private_name_crosses_a_module():
    long, private = [], []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_cli"):
                private += [f"{name} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_inspect_loads_neither_tensorflow_nor_scikit_learn(shapes):
    import subprocess
    import sys

    code = (f"import sys; from finetune_cli import api; api.inspect({str(shapes)!r})\n"
            "print([m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules])")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "[]"
