"""The repository's import graph keeps the architecture's one-way dependencies (README, "Repository
layout"): read statically from the sources, so a forbidden import fails here before it is ever run."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("policy_core", "server", "trainer", "clients", "proto", "benchmarks")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    found = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    found["dpmlx"] = ROOT / "dpmlx.py"
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (local and TYPE_CHECKING imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # ``from package import module`` depends on the module; the package's __init__ runs first for
            # any of its submodules and is not counted as a dependency.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules if len(submodules) == len(node.names) else {base} | submodules
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def _inside(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycles():
    graph = _graph()
    graph = {module: {d for d in deps if d in graph and d != module} for module, deps in graph.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_dependencies_point_one_way():
    for module, deps in _graph().items():
        project = {d for d in deps if _inside(d, *PACKAGES)}
        if _inside(module, "policy_core"):
            assert not {d for d in project if not _inside(d, "policy_core")}, module
        if _inside(module, "policy_core.nets"):
            assert all(_inside(d, "policy_core.nets") for d in project), (module, project)
        if _inside(module, "policy_core.backends"):
            allowed = (
                "policy_core.backends",
                "policy_core.nets",
                "policy_core.schedulers",
                "policy_core.seen_arrays",
            )
            assert all(_inside(d, *allowed) for d in project), (module, project)
        if _inside(module, "proto", "clients"):
            assert all(_inside(d, "proto", "clients") for d in project), (module, project)
            assert not any(_inside(d, "mlx") for d in deps), f"{module} imports MLX"
        if _inside(module, "trainer"):
            assert not any(_inside(d, "server", "benchmarks") for d in project), (module, project)


def test_the_policy_names_no_backend_internals():
    # The policy talks to the backends through their interface only: no CUDA or BLAS module or name.
    deps = _graph()["policy_core.policy"]
    assert {d for d in deps if _inside(d, "policy_core.backends")} <= {
        "policy_core.backends",
        "policy_core.backends.base",
    }
    tree = ast.parse((ROOT / "policy_core" / "policy.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not [n for n in names if "cuda" in n.lower() or "blas" in n.lower()]
