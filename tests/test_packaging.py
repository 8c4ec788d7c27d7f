"""Packaging tests: cheap imports, self-contained kernels package, kernels in the wheel."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

_IMPORT_PROBE = textwrap.dedent("""
    import sys, os
    FORBIDDEN = ("tensorflow", "torch")
    REPO = sys.argv[1]
    attempts = []

    class Watch:
        # Records import attempts of the forbidden packages made directly from repo code,
        # so a guarded `try: import torch` counts even when torch is not installed.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                f = sys._getframe(1)
                while f is not None and f.f_code.co_filename.startswith("<frozen"):
                    f = f.f_back
                where = f.f_code.co_filename if f is not None else "?"
                if os.path.abspath(where).startswith(REPO + os.sep):
                    attempts.append((name, where))
            return None

    sys.meta_path.insert(0, Watch())
    import glm5v_jax
    import glm5v_jax.models.vlm
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    print("LOADED", loaded)
    print("ATTEMPTS", attempts)
    assert not loaded and not attempts
""")


def test_import_does_not_pull_tensorflow_or_torch():
    """`import glm5v_jax` and `glm5v_jax.models.vlm` load (and try) neither tensorflow nor torch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(REPO)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_kernels_only_import_glm5v_jax_kernels():
    """No file under kernels/ imports a glm5v_jax module outside glm5v_jax.kernels."""
    files = sorted((REPO / "kernels").rglob("*.py"))
    assert REPO / "kernels" / "__init__.py" in files and REPO / "kernels" / "reference.py" in files
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for mod in _imported_modules(tree):
            top_ok = mod == "glm5v_jax.kernels" or mod.startswith("glm5v_jax.kernels.")
            if (mod == "glm5v_jax" or mod.startswith("glm5v_jax.")) and not top_ok:
                bad.append(f"{path.relative_to(REPO)}: {mod}")
    assert not bad, bad


def test_kernels_public_imports():
    """`from glm5v_jax.kernels import attention_reference, gmm_reference` works, from kernels/."""
    import glm5v_jax.kernels as kernels
    from glm5v_jax.kernels import attention_reference, gmm_reference

    assert callable(attention_reference) and callable(gmm_reference)
    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"


def _can_build_without_isolation():
    """setuptools needs the `wheel` package for bdist_wheel before it vendored it (70.1)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        import setuptools
        major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
        return (major, minor) >= (70, 1)
    except Exception:  # noqa: BLE001
        return False


def test_wheel_contains_kernels(tmp_path):
    """A wheel built from the repo ships glm5v_jax/kernels/{__init__,reference}.py."""
    # Build from a copy so no build/ or *.egg-info lands in the work tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("glm5v_jax", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path / "dist"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    # Offline first; otherwise let pip fetch setuptools and wheel into an isolated build env.
    attempts = ([base[:4] + ["--no-build-isolation"] + base[4:]] if _can_build_without_isolation()
                else []) + [base]
    logs = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
        logs.append(proc.stdout + proc.stderr)
        if proc.returncode == 0:
            break
    wheels = list(out.glob("glm5v_jax-*.whl"))
    assert wheels, "wheel build failed:\n" + "\n----\n".join(logs)
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    assert "glm5v_jax/kernels/__init__.py" in names
    assert "glm5v_jax/kernels/reference.py" in names
    assert "glm5v_jax/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)  # only under glm5v_jax/


def _module_name(path: Path) -> str:
    """Dotted module name of a library file (`kernels/` is installed as glm5v_jax.kernels)."""
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["glm5v_jax", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _load_time_imports(tree, module: str, is_package: bool):
    """Modules a file imports when it is loaded: top-level statements (also inside top-level
    if / try blocks), not inside functions or classes, which run later."""
    package = module if is_package else module.rpartition(".")[0]

    def walk(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, ()
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                yield base, tuple(alias.name for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from walk(inner)

    yield from walk(tree.body)


def _import_graph():
    """{module: set of glm5v_jax modules it imports at load time} over glm5v_jax/ and kernels/."""
    files = sorted((REPO / "glm5v_jax").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for base, names in _load_time_imports(ast.parse(path.read_text(), filename=str(path)), name,
                                              path.name == "__init__.py"):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules] or [base]
            for target in targets:
                while target and target != name:  # importing a.b.c also runs a and a.b
                    if target in modules and not name.startswith(target + "."):
                        edges.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (or a self-import)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycles():
    """No glm5v_jax module imports (at load time, directly or through others) a module that
    imports it back: implementation tables are filled where they are defined, never by a
    side-effect import at the bottom of another module."""
    graph = _import_graph()
    assert "glm5v_jax.layers.moe" in graph and "glm5v_jax.kernels.reference" in graph
    assert "glm5v_jax.layers.attention_kernels" in graph["glm5v_jax.layers.attention"]
    assert _cycles(graph) == []


def test_import_cycle_check_finds_a_cycle():
    """The check above can fail: a two-module and a three-module cycle are reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(graph) == [["a", "b"], ["c", "d", "e"]]


def test_implementation_tables_are_complete():
    """The attention and MoE tables list every implementation without a side-effect import."""
    from glm5v_jax.layers.attention import ATTENTION_IMPLS
    from glm5v_jax.layers.moe import MOE_IMPLS

    assert set(ATTENTION_IMPLS) >= {"xla", "pallas", "cudnn"}
    assert set(MOE_IMPLS) == {"dense", "ragged_dot", "expert_parallel", "pallas"}
