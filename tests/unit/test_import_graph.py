"""The import graph of ``tb_reranker/`` and ``milvus_setup/``, read from the source with ``ast``.

Rules (docs/architecture.md):
  * no import cycle among our modules;
  * only ``tb_reranker.server`` and ``tb_reranker.cli`` import ``tb_reranker.server`` (the SDK,
    the library and the tools never depend on the sidecar);
  * the library never imports the deployment tool ``milvus_setup`` (the ``tb`` CLI may wrap it).

Every ``import`` statement counts, module level or inside a function (a lazy import closes a loop
at run time just the same), and those under ``if TYPE_CHECKING:`` too (never executed, but a
type-level circle is still two modules that cannot be understood one without the other). Edges go
to the module the statement names (``from a.b import c`` -> ``a.b.c`` when that is a module,
else ``a.b``); the implicit import of parent packages is not an edge, and neither is an import of
the generated stubs (``tb_reranker._pb``). Imports of other distributions (torch, open_clip, ...)
are not part of the graph. ``importlib`` calls with computed names (``tb_reranker.__getattr__``)
are not seen.

Run as a script to print the graph as Graphviz dot:
``python tests/unit/test_import_graph.py > imports.dot``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tb_reranker", "milvus_setup")
GENERATED = ("tb_reranker._pb",)  # protoc output: not ours to arrange

# Deprecated aliases kept for old user code (issue 21 §3): module -> the names it still answers
# for (``None``: every name). Our code, tests and benchmarks import the new places.
DEPRECATED_IMPORTS: dict[str, frozenset[str] | None] = {
    "tb_reranker.index": frozenset(
        {"FrameRecord", "FrameStore", "LmdbFrameStore", "open_store", "validate_video_id"}
    ),
    "tb_reranker.rerank.backend": frozenset({"InProcessBackend"}),
    "tb_reranker.server.backend": None,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            if not name.startswith(GENERATED):
                modules[name] = path
    return modules


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, ``if TYPE_CHECKING:`` bodies included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, name, path.name == "__init__.py")
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            targets.add(submodule if submodule in modules else source)
    found = set()
    for target in targets:
        if target.startswith(GENERATED):  # not ours; its parent packages are not edges either
            continue
        # "import a.b.c" of a name that is not a module file: its nearest module ancestor
        while target and target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (the cycles), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ---- tests ---------------------------------------------------------------------------------------
def test_the_graph_is_read_from_the_code() -> None:
    graph = import_graph()
    assert len(graph) > 50
    assert "tb_reranker.model.tokenbinder" in graph["tb_reranker.model.checkpoint"]
    assert "tb_reranker.model.fusion" in graph["tb_reranker.model.tokenbinder"]
    # function-level imports count
    assert "tb_reranker.training.evaluate" in graph["tb_reranker.training.ablation"]
    # so do the imports under ``if TYPE_CHECKING:`` (tb_reranker/__init__.py has only those)
    assert "tb_reranker.client" in graph["tb_reranker"]
    # the generated stubs are no edge, nor is the package above them
    assert "tb_reranker" not in graph["tb_reranker.wire"]


def test_cycle_detection_finds_loops() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles among our modules:\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_only_the_server_and_the_cli_import_the_server() -> None:
    offenders = sorted(
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if _is_under(target, "tb_reranker.server")
        and not _is_under(name, "tb_reranker.server")
        and not _is_under(name, "tb_reranker.cli")
    )
    assert not offenders, f"modules outside server/ and cli/ import the server: {offenders}"


def test_the_library_does_not_import_the_deployment_tool() -> None:
    offenders = sorted(
        (name, target)
        for name, targets in import_graph().items()
        for target in targets
        if _is_under(name, "tb_reranker")
        and not _is_under(name, "tb_reranker.cli")
        and _is_under(target, "milvus_setup")
    )
    assert not offenders, f"tb_reranker imports milvus_setup: {offenders}"


def test_the_layers_of_the_storage_and_index_packages() -> None:
    """The frame stores know nothing of Milvus or the index (only the errors and the one S3
    client factory, which itself needs nothing but the errors); the schema needs nothing of ours
    (the library and the deployment tool share it)."""
    graph = import_graph()
    assert graph["tb_reranker.s3"] <= {"tb_reranker.errors"}
    for name, targets in graph.items():
        if _is_under(name, "tb_reranker.stores"):
            ours = {t for t in targets if not _is_under(t, "tb_reranker.stores")}
            assert ours <= {"tb_reranker.errors", "tb_reranker.s3"}, (
                f"{name} imports {sorted(ours)}"
            )
    assert graph["tb_reranker.index.schema"] == set()
    assert "tb_reranker.index.schema" in graph["milvus_setup.cli"]


def _deprecated_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            hits += [a.name for a in node.names if DEPRECATED_IMPORTS.get(a.name, ()) is None]
        elif isinstance(node, ast.ImportFrom) and node.module in DEPRECATED_IMPORTS:
            names = DEPRECATED_IMPORTS[node.module]
            hits += [
                f"{node.module}.{a.name}" for a in node.names if names is None or a.name in names
            ]
    return [f"{path.relative_to(ROOT)}: {hit}" for hit in hits]


def test_no_code_of_ours_imports_a_deprecated_alias() -> None:
    """The store names come from ``tb_reranker.stores``, ``InProcessBackend`` from
    ``tb_reranker.rerank``, the sidecar's core from ``tb_reranker.server.engine``: the old places
    answer only for old user code (with a ``DeprecationWarning``), not for ours, our tests or our
    benchmarks (docs/architecture.md)."""
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    for folder in ("tests", "benchmarks"):
        paths += sorted((ROOT / folder).rglob("*.py"))
    shims = {ROOT / "tb_reranker/server/backend.py"}
    offenders = [hit for path in paths if path not in shims for hit in _deprecated_imports(path)]
    assert not offenders, "deprecated imports:\n" + "\n".join(offenders)


if __name__ == "__main__":
    graph = import_graph()
    out = ["digraph imports {", "  rankdir=LR; node [shape=box, fontsize=10];"]
    for name in sorted(graph):
        for target in sorted(graph[name]):
            out.append(f'  "{name}" -> "{target}";')
    out.append("}")
    sys.stdout.write("\n".join(out) + "\n")
