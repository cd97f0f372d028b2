"""The repository's layout and layering: what sits at the root, who imports whom,
and that the README names only paths that exist."""
import ast
import re
from pathlib import Path
from typing import Dict, Set

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {"train_search.py", "train_CIFAR10.py", "train_CIFAR100.py", "train_ImageNet.py",
           "test_CIFAR10.py", "test_CIFAR100.py", "test_imagenet.py", "visualize.py",
           "plot_search.py", "cost.py", "reproduce.py"}
SEARCH_SPACE = {"operations.py", "attentions.py", "genotypes.py", "model_search.py", "model.py",
                "architect.py"}
NETWORKS = {"model", "model_search", "architect"}
# The run mechanics: checkpoints and run directory, devices, precision, graphs, metrics.
MECHANICS = {"atomic", "errors", "parallel", "precision", "cuda_graphs", "dispatch", "recompute",
             "data", "experiment", "metrics", "history", "figures", "complexity", "early_stop",
             "imagenet_sample"}


def _modules() -> Dict[str, Path]:
    """Every importable module of the project by dotted name (root modules and runtime.*)."""
    modules = {p.stem: p for p in REPO.glob("*.py")}
    modules.update({f"runtime.{p.stem}": p for p in (REPO / "runtime").glob("*.py")
                    if p.stem != "__init__"})
    return modules


def _imports(path: Path, known: Set[str]) -> Set[str]:
    """The project modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


@pytest.fixture(scope="module")
def graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def test_the_root_holds_the_scripts_and_the_search_space_only():
    allowed = SCRIPTS | SEARCH_SPACE | {"requirements.txt", "README.md", "pytest.ini",
                                        "runtime", "tests", "bench"}
    tracked = {p.name for p in REPO.iterdir() if not p.name.startswith(".")
               and p.name != "__pycache__" and p.name not in ("exp", "data", "runs")}
    assert tracked - allowed == set()
    assert SEARCH_SPACE <= tracked


def test_the_package_never_imports_a_script(graph):
    scripts = {Path(s).stem for s in SCRIPTS}
    for name, imports in graph.items():
        if name.startswith("runtime."):
            assert not imports & scripts, f"{name} imports a script: {imports & scripts}"


def test_run_mechanics_know_no_network_class(graph):
    def reach(name: str, seen: Set[str]) -> Set[str]:
        for imported in graph.get(name, ()):
            if imported not in seen:
                seen.add(imported)
                reach(imported, seen)
        return seen

    for name in MECHANICS:
        reached = reach(f"runtime.{name}", set())
        assert not reached & NETWORKS, f"runtime.{name} reaches {reached & NETWORKS}"


def test_no_import_cycles(graph):
    visiting, done = set(), set()

    def visit(name: str, path: list) -> None:
        assert name not in visiting, "import cycle: " + " -> ".join(path + [name])
        if name in done:
            return
        visiting.add(name)
        for imported in sorted(graph.get(name, ())):
            visit(imported, path + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])


def test_every_path_the_readme_names_exists():
    """A file named with its folder must exist there; a bare module name at the root, in
    runtime/, bench/ or tests/.  The original release's own files are named for porting."""
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|sh|ini))`", readme))
    original = {"arch.py", "constants.py", "utils.py", "original_step.py"}
    missing = []
    for name in named - original:
        places = [REPO / name] if "/" in name else [REPO / folder / name for folder in
                                                     (".", "runtime", "bench", "tests")]
        if not any(place.exists() for place in places) and not name.startswith("exp/"):
            missing.append(name)
    assert sorted(missing) == []
