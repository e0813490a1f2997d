"""The project's imports form no cycle and point down the layers: kernels <- parallel <- lsys <- benchmarks <- launch.

The graph is read from the source with `ast`, not by importing: every import statement counts,
at module level or inside a function, since a function-level import only hides a cycle until the
function runs. `from X import Y` is an import of the module X.Y when there is one, else of X.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The installed packages and the benchmark harness are walked as packages, launch/ as scripts.
PACKAGES = ("kernels", "parallel", "lsys", "benchmarks")
SCRIPTS = "launch"
# Imports of these top-level names are the project's; tests/ is not walked, but an import of it counts.
PROJECT = (*PACKAGES, SCRIPTS, "tests")
# What each top-level folder may import. The installed packages import nothing of benchmarks/ or
# tests/ (neither ships with them); launch scripts import everything else and are imported by nothing.
MAY_IMPORT = {
    "kernels": {"kernels"},
    "parallel": {"parallel", "kernels"},
    "lsys": {"lsys", "parallel", "kernels"},
    "benchmarks": {"benchmarks", "lsys", "parallel", "kernels", "tests"},  # tests: the local-ranks helper
    "launch": {"benchmarks", "lsys", "parallel", "kernels"},
}


def project_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (source file, whether it is a package's __init__) for every module under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    for path in sorted((root / SCRIPTS).glob("*.py")):
        modules[f"{SCRIPTS}.{path.stem}"] = (path, False)
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules its import statements name, for every module under `root`."""
    modules = project_modules(root)
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, is_package)
                # `from X import Y` imports the module X.Y when Y is one, else a name defined in X.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {_known_prefix(target, modules) for target in targets if target.split(".")[0] in PROJECT}
    return graph


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` reads from, its relative form resolved against `module`."""
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known_prefix(target: str, modules: dict[str, tuple[Path, bool]]) -> str:
    """`target`, or the longest leading part of it that is a module (an import of a name inside one)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return target  # a module that is not there: shown as named, so a check can name it


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle a depth-first walk closes, each written `a -> b -> a`."""
    found = []
    finished: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if target in path:
                found.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in finished:
                visit(target)
        path.pop()
        finished.add(module)

    for module in sorted(graph):
        if module not in finished:
            visit(module)
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a folder that the importer's folder may not import, per MAY_IMPORT."""
    found = []
    for module, targets in sorted(graph.items()):
        layer = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] not in MAY_IMPORT[layer]:
                allowed = ", ".join(sorted(MAY_IMPORT[layer]))
                found.append(f"{module} imports {target}: {layer} may import only {allowed}")
    return found


def test_project_imports_have_no_cycle():
    graph = import_graph(REPO)
    assert "lsys.train.trainer" in graph["launch.train"]  # the walk saw the project
    found = cycles(graph)
    assert not found, "import cycles (move what both sides need into a module of its own):\n" + "\n".join(found)


def test_project_imports_point_down_the_layers():
    found = layer_violations(import_graph(REPO))
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_checks_report_a_cycle_and_a_layer_violation(tmp_path):
    """The checks above, on a small tree with a cycle (a relative and a function-level import) and an upward import."""
    files = {
        "kernels/__init__.py": "",
        "kernels/a.py": "from .b import helper\n",
        "kernels/b.py": "def helper():\n    from kernels import a\n",
        "kernels/c.py": "import os\nimport parallel.ring\n",
        "parallel/__init__.py": "",
        "parallel/ring.py": "from kernels.a import helper\n",
        "launch/train.py": "import parallel\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert cycles(graph) == ["kernels.a -> kernels.b -> kernels.a"]
    assert layer_violations(graph) == [
        "kernels.c imports parallel.ring: kernels may import only kernels",
    ]
