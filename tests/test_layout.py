"""The package's shape: no import cycle between project modules (imports inside functions included), no module
over 450 lines, `__all__` in every module, and no private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cnnprior.core.errors import UserError
from cnnprior.evaluate.config import generator_keys, parse_explainers
from cnnprior.gan.models.base import L1_SUFFIX, names

PACKAGE = Path(__file__).resolve().parents[1] / "cnnprior"
MAX_LINES = 450


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth of the file (functions, TYPE_CHECKING blocks too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        deps = project_imports(path, known)
        # a package's own __init__ is not an edge of its submodules (importing a.b runs a/__init__ first anyway)
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_finds_a_cycle(tmp_path):
    pkg = tmp_path / "cnnprior"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("def f():\n    from cnnprior.a.y import g\n")  # inside a function
    (pkg / "a" / "y.py").write_text("from cnnprior.a import x\n")
    assert find_cycle(import_graph(pkg)) == ["cnnprior.a.x", "cnnprior.a.y", "cnnprior.a.x"]
    (pkg / "a" / "y.py").write_text("import numpy\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_shape(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: over {MAX_LINES} lines"
    tree = ast.parse(text)
    if path.name not in ("__init__.py", "__main__.py"):
        assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                   for n in tree.body), f"{path.name}: no __all__"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnnprior"):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not private, f"{path.name}: imports private {private} from {node.module}"


def test_stages_import_no_later_stage():
    order = ["core", "maps", "present", "data", "cnn", "priors", "zoo", "gan", "explain", "evaluate", "study"]
    graph = import_graph()
    for mod, deps in graph.items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] not in order:
            continue
        for dep in deps:
            dparts = dep.split(".")
            if len(dparts) >= 2 and dparts[1] in order:
                assert order.index(dparts[1]) <= order.index(parts[1]), f"{mod} imports the later stage {dep}"


def test_every_generator_is_an_evaluation_key():
    """Every registered generator, and each GAN's L1-only twin, is a key of the evaluation's generator mapping."""
    keys = generator_keys()
    assert set(names()) <= set(keys) and {g + L1_SUFFIX for g in names(adversarial=True)} <= set(keys)
    assert parse_explainers({k: f"{k}.pt" for k in keys}, "loc", "where") == {k: f"{k}.pt" for k in keys}
    with pytest.raises(UserError, match="did you mean 'lsft'"):
        parse_explainers({"lsfr": "x.pt"}, "loc", "where")


def test_importing_the_package_and_loading_a_config_import_no_heavy_library():
    """`import cnnprior` and parsing a run config stay light: grad-cam, OpenCV and matplotlib load only in the
    stages that draw or compute CAMs."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_resnet18.yaml"
    code = ("import sys, cnnprior\n"
            "from cnnprior.core.config import load_config\n"
            f"load_config({str(config)!r}, [])\n"
            "heavy = [m for m in ('pytorch_grad_cam', 'cv2', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
