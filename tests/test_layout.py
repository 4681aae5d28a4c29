"""The package's rooms and the one-way arrows between them (docs/layout.md), read from the source.

Every ``import`` of the package's own modules counts, at module level or inside a function (a
lazy import is still a dependency a reader has to follow), except under ``if TYPE_CHECKING:``,
which never runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mergekit_expo"

# room -> the rooms it may import from (besides itself)
ALLOWED = {
    "errors": set(),  # errors.py: ExpoError, the base of every refusal
    "merge": {"errors"},  # the kernel, on mergekit's public API
    "reads": {"errors"},  # patches/reads.py and patches/record.py: private reads, records
    "output": {"errors"},  # what may be written where; staging an output folder
    "plan": {"merge", "reads", "errors"},  # the one reading of a config
    "check": {"merge", "plan", "reads", "output", "errors"},
    # the wraps of mergekit; they run the checks
    "patches": {"merge", "plan", "check", "reads", "output", "errors"},
    # package: the version
    "search": {"merge", "plan", "check", "lora", "reads", "output", "package", "errors"},
    "lora": {"merge", "output", "errors"},  # modules_to_save go through merge.formula
    "demo": set(),
    "package": {"merge", "startup", "patches", "errors"},  # METHOD_NAME and register()
    "startup": {"patches"},
    "cli": {"merge", "plan", "search", "demo", "check", "lora", "output", "errors"},
}
# modules of patches/ that the plan, the checks and the search may import: they wrap nothing
READS = {"reads", "record"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] == "patches" and len(parts) > 2 and parts[2] in READS:
        return "reads"
    return {"_startup": "startup"}.get(parts[1], parts[1])


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's own modules that ``path`` imports (``from a import b`` may name a module)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def _runtime_nodes(tree: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_sits_in_a_known_room():
    assert {room(name) for name in modules()} == set(ALLOWED)


@pytest.mark.parametrize("source", sorted(ALLOWED))
def test_dependencies_run_one_way(source):
    wrong = {
        (name, target)
        for name, targets in graph().items()
        if room(name) == source
        for target in targets
        if room(target) != source and room(target) not in ALLOWED[source]
    }
    assert not wrong, f"{source} imports what it may not: {sorted(wrong)}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target] if target in path else [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_method_module_imports_its_helpers_directly():
    """method.py reads like mergekit's linear.py: its helpers one import away, not a chain."""
    edges = graph()
    helpers = edges["mergekit_expo.merge.method"] - {"mergekit_expo.merge"}
    assert helpers == {
        "mergekit_expo.merge.formula",
        "mergekit_expo.merge.guards",
        "mergekit_expo.merge.parameters",
        "mergekit_expo.merge.roles",
        "mergekit_expo.merge.rounding",
    }
    for helper in helpers:  # the kernel's exact rounding and its compiled form are the kernel
        allowed = {"mergekit_expo.merge", "mergekit_expo.merge.parameters", "mergekit_expo.errors"}
        if helper == "mergekit_expo.merge.formula":
            allowed |= {"mergekit_expo.merge.rounding", "mergekit_expo.merge.native"}
        further = edges[helper] - allowed
        assert not further, f"{helper} sends a reader on to {sorted(further)}"


def test_start_up_modules_import_nothing_heavy_at_module_level():
    """The .pth runs these at every interpreter start-up: torch and mergekit must wait."""
    for name in ("mergekit_expo", "mergekit_expo._startup", "mergekit_expo.merge"):
        tree = ast.parse(modules()[name].read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        heavy = {n for n in names if n.split(".")[0] in {"torch", "mergekit", "transformers"}}
        assert not heavy, f"{name} imports {sorted(heavy)} at start-up"
