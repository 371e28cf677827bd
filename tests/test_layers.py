"""The import graph of the repo's own modules: no import circles, and no import from a lower layer to a higher
one (LAYERS, lowest first). An import inside a function counts (a lazy import is still a dependency); one
under `if TYPE_CHECKING:` does not (it never runs). The checker is tested on planted packages first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "wan", "pipeline", "trainer", "model", "scripts")
TOP_LEVEL = ("train", "inference", "download_models")

# (layer, module prefixes), lowest first: a module may import its own layer and the ones before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("utils", ("utils",)),  # its subpackages too: utils.world, utils.encoders, utils.pose
    ("network", ("wan",)),
    (
        "sampling core",
        (
            "pipeline.conditions",
            "pipeline.rollout",
            "pipeline.self_forcing_rollout",
            "pipeline.ode_pairs",
            "pipeline.world",
            "pipeline.streaming",
        ),
    ),
    ("trainer", ("trainer",)),
    ("objectives", ("model",)),
    ("inference pipelines", ("pipeline.causal_diffusion_inference", "pipeline.bidirectional_inference")),
    ("entry points", ("scripts", *TOP_LEVEL)),
]


def find_modules(root: Path, packages: tuple[str, ...], top_level: tuple[str, ...] = ()) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (pkg/__init__.py is `pkg`)."""
    modules = {name: root / f"{name}.py" for name in top_level if (root / f"{name}.py").is_file()}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runs(node: ast.AST) -> list[ast.AST]:
    """The statements under `node` that execute: `if TYPE_CHECKING:` bodies are left out."""
    out = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            out.extend(_runs(ast.Module(body=child.orelse, type_ignores=[])))
            continue
        out.append(child)
        out.extend(_runs(child))
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repo modules `name` imports (the deepest existing module of each import; parents are implicit)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runs(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, else the module itself
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]]) -> int:
    """Index of the layer whose longest prefix matches the module."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best < 0:
        raise KeyError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py")
    return best


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                low, high = layers[layer_of(module, layers)][0], layers[layer_of(target, layers)][0]
                out.append(f"{module} ({low}) imports {target} ({high})")
    return out


# ----------------------------------------------------------------------------- the checker on planted packages


def _plant(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return import_graph(find_modules(root, ("low", "high")))


def test_the_checker_finds_a_lazy_circle_and_an_upward_import(tmp_path):
    graph = _plant(
        tmp_path,
        {
            "low/__init__.py": "",
            "low/a.py": "from low import b\n",
            "low/b.py": "def f():\n    from low.c import g\n",  # lazy, still an edge
            "low/c.py": "import low.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import high.x\n",
            "high/__init__.py": "",
            "high/x.py": "from ..low.a import thing\nfrom low import c\n",
            "high/y.py": "from . import x\n",
        },
    )
    assert graph["low.b"] == {"low.c"} and graph["low.c"] == {"low.a"}  # TYPE_CHECKING imports do not run
    assert graph["high.y"] == {"high.x"}
    assert find_cycle(graph) == ["low.a", "low.b", "low.c", "low.a"]
    layers = [("low", ("low",)), ("high", ("high",))]
    assert upward_imports(graph, layers) == []
    graph["low.a"].add("high.x")
    assert upward_imports(graph, layers) == ["low.a (low) imports high.x (high)"]
    with pytest.raises(KeyError, match="no layer"):
        layer_of("other.z", layers)


# ----------------------------------------------------------------------------- the repo


@pytest.fixture(scope="module")
def repo_graph() -> dict[str, set[str]]:
    return import_graph(find_modules(ROOT, PACKAGES, TOP_LEVEL))


def test_no_import_circles(repo_graph):
    cycle = find_cycle(repo_graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_imports(repo_graph):
    assert "wan.checkpoint" in repo_graph and "pipeline.rollout" in repo_graph  # the walk found the packages
    assert {"utils.world.synthetic_pose", "utils.encoders.wan_wrapper"} <= set(repo_graph)  # and the subpackages
    assert upward_imports(repo_graph, LAYERS) == []


def test_training_imports_nothing_from_the_inference_pipelines(repo_graph):
    inference = {"pipeline.causal_diffusion_inference", "pipeline.bidirectional_inference"}
    training = {m: t for m, t in repo_graph.items() if m.split(".")[0] in ("model", "trainer")}
    assert {m: t & inference for m, t in training.items() if t & inference} == {}
