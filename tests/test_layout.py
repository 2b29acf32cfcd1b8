"""The package's layout: imports flow one way (CLI -> tools and integrations -> block -> parts -> functional / ops),
with no back-edge, and source files stay small. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "cbam_dsa"
MAX_LINES = 400
# Files over MAX_LINES that are known and left for a later split (their size may not grow).
KNOWN_LARGE: dict[str, int] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {_module_name(path) for path in SOURCES}


def _resolve(name: str) -> str:
    """The module ``name`` (a module, or ``module.attribute``) lives in: its longest prefix that is a module."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> set[str]:
    """The cbam_dsa modules that ``path`` imports, anywhere in the file (inside functions too): for
    ``from package import name``, the module ``package.name`` where it is one, else ``package``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.update(_resolve(f"{source}.{alias.name}") for alias in node.names)
    return {_resolve(name) for name in found if name == "cbam_dsa" or name.startswith("cbam_dsa.")}


def _registered_commands() -> set[str]:
    """The modules ``cbam_dsa.cli.COMMANDS`` names (imported by name, with importlib, when the parser is built)."""
    tree = ast.parse((PACKAGE / "cli" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "COMMANDS":
            return {value.value for value in node.value.values}
    raise AssertionError("cbam_dsa/cli/__init__.py defines no COMMANDS")


GRAPH = {_module_name(path): _imports(path) for path in SOURCES}
GRAPH["cbam_dsa.cli"] |= _registered_commands()
COMMAND_LINE = {name for name in GRAPH if name == "cbam_dsa.cli" or name.startswith("cbam_dsa.cli.")}


def _reaches(imported: str, target: str) -> bool:
    return imported == target or imported.startswith(target + ".")


def test_the_graph_sees_the_known_edges():
    # the reader itself: a relative import inside a function, and one from a package's __init__
    assert "cbam_dsa.cli.errors" in GRAPH["cbam_dsa.cli.bench"]
    assert "cbam_dsa.cli.errors" in GRAPH["cbam_dsa.cli.demo"]
    assert "cbam_dsa.cli.errors" in GRAPH["cbam_dsa.cli"]
    assert "cbam_dsa.block" in GRAPH["cbam_dsa.integrations.timm"]
    assert "cbam_dsa.demo.model" in GRAPH["cbam_dsa.cli.visualize"]
    assert {"cbam_dsa.cli.bench", "cbam_dsa.cli.demo"} <= GRAPH["cbam_dsa.cli"]  # the registered subcommands


@pytest.mark.parametrize("module", sorted(set(GRAPH) - COMMAND_LINE))
def test_library_modules_do_not_import_the_command_line(module):
    back = sorted(name for name in GRAPH[module] if _reaches(name, "cbam_dsa.cli"))
    assert not back, f"{module} imports {back}: the library must not depend on the command line"


def test_the_command_line_modules_import_user_error_from_its_leaf_module():
    errors = PACKAGE / "cli" / "errors.py"
    assert _imports(errors) == set()  # a leaf: imports nothing of cbam_dsa
    for name in COMMAND_LINE - {"cbam_dsa.cli", "cbam_dsa.cli.errors", "cbam_dsa.cli.__main__"}:
        assert "cbam_dsa.cli" not in GRAPH[name], name


def test_integrations_do_not_import_each_other():
    assert not any(_reaches(name, "cbam_dsa.integrations.timm") for name in GRAPH["cbam_dsa.integrations.torchvision"])
    assert not any(_reaches(name, "cbam_dsa.integrations.torchvision") for name in GRAPH["cbam_dsa.integrations.timm"])


def test_the_cbam_converters_share_only_their_helpers():
    # timm's CbamModule and the original layout are read by two modules that share _cbam, never each other (nor
    # another integration: only the shared, private helper modules)
    integrations = {name.rpartition(".")[2] for name in GRAPH if name.startswith("cbam_dsa.integrations.")}
    for converter in ("cbam_timm", "cbam_original"):
        imported = GRAPH[f"cbam_dsa.integrations.{converter}"]
        assert "cbam_dsa.integrations._cbam" in imported, converter
        for name in sorted(integrations - {converter}):
            if not name.startswith("_"):
                assert not any(_reaches(i, f"cbam_dsa.integrations.{name}") for i in imported), f"{converter}: {name}"
    assert not any(name.startswith("cbam_dsa.integrations.") for name in GRAPH["cbam_dsa.integrations._cbam"])


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("cbam_dsa.functional", "cbam_dsa.block"),
        ("cbam_dsa.channel", "cbam_dsa.block"),
        ("cbam_dsa.spatial", "cbam_dsa.block"),
        ("cbam_dsa.ops", "cbam_dsa.block"),
        ("cbam_dsa.block", "cbam_dsa.integrations"),
        ("cbam_dsa.block", "cbam_dsa.bench"),
        ("cbam_dsa.bench", "cbam_dsa.cli"),
        ("cbam_dsa.viz", "cbam_dsa.demo"),
    ],
)
def test_data_flows_one_way(lower, upper):
    below = [name for name in GRAPH if _reaches(name, lower)]
    for module in below:
        assert not any(_reaches(name, upper) for name in GRAPH[module]), f"{module} imports {upper}"


def test_no_import_circle_between_modules():
    # An import inside a function counts too: it still couples the two files. A module importing a package above
    # it (its __init__ re-exports, or `from .. import name` of a sibling) is not counted as an edge to that package.
    edges = {
        module: {target for target in imported if target != module and not module.startswith(target + ".")}
        for module, imported in GRAPH.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target] if target in path else [node, target]
                pytest.fail("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_source_files_stay_small(path):
    lines = len(path.read_text().splitlines())
    limit = KNOWN_LARGE.get(str(path.relative_to(PACKAGE)), MAX_LINES)
    assert lines <= limit, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {limit}): split it"
