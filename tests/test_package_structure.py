"""The package's architecture, checked on its source: no import cycle, the three parts
import only what ARCHITECTURE.md allows, no private names across modules, no class made
inside a function, no function-level import of our own modules."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "softdimo_jax"

# What each part may import from softdimo_jax (prefixes of module names).
ALLOWED = {
    "softdimo_jax.models": ("softdimo_jax.models",),
    "softdimo_jax.core": ("softdimo_jax.models", "softdimo_jax.core", "softdimo_jax.runtime.mesh",
                          "softdimo_jax.runtime.errors"),
    "softdimo_jax.runtime": ("softdimo_jax.runtime", "softdimo_jax.conversion.state_dict"),
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


MODULES = {name: (path, tree) for name, path, tree in _modules()}


def _resolve(node, module, is_package):
    """Absolute module names imported by an Import / ImportFrom node (names of imported
    submodules included: `from softdimo_jax.core import dimo` imports softdimo_jax.core.dimo)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = [base]
    out += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return out


def _imports(name, tree, *, top_level_only=False):
    path, _ = MODULES[name]
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found += [m for m in _resolve(node, name, is_package) if m.startswith("softdimo_jax")]
    return found


def _graph():
    return {name: {m for m in _imports(name, tree) if m in MODULES and m != name}
            for name, (_, tree) in MODULES.items()}


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            # A package importing its own submodules (e.g. pipelines/__init__) is no cycle
            # unless a submodule imports the package back.
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _is_empty_package(m):
    """A package whose __init__ imports none of our modules: importing it pulls in nothing."""
    path, tree = MODULES.get(m, (None, None))
    return path is not None and path.name == "__init__.py" and not _imports(m, tree)


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layering(part):
    bad = []
    for name, (_, tree) in MODULES.items():
        if name == part or name.startswith(part + "."):
            for m in _imports(name, tree):
                if not _is_empty_package(m) and not m.startswith(ALLOWED[part]):
                    bad.append(f"{name} imports {m}")
    assert not bad, "\n".join(bad)


def test_core_does_no_io_and_no_infrastructure():
    banned = ("orbax", "clu", "absl", "tensorflow", "tensorflow_datasets", "os", "json", "pathlib", "shutil")
    bad = []
    for name, (_, tree) in MODULES.items():
        if name.startswith("softdimo_jax.core"):
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    bad += [f"{name}: import {a.name}" for a in node.names if a.name.split(".")[0] in banned]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned:
                    bad.append(f"{name}: from {node.module}")
                elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                    bad.append(f"{name}: open()")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for name, (_, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softdimo_jax"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, "\n".join(bad)


def test_no_class_defined_inside_a_function():
    bad = []
    for name, (_, tree) in MODULES.items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                bad += [f"{name}: class {c.name} inside {fn.name}()" for c in ast.walk(fn) if isinstance(c, ast.ClassDef)]
    assert not bad, "\n".join(bad)


def test_no_function_level_import_of_our_modules():
    bad = []
    for name, (_, tree) in MODULES.items():
        top = set(id(n) for n in tree.body)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                mods = _resolve(node, name, MODULES[name][0].name == "__init__.py")
                if any(m.startswith("softdimo_jax") for m in mods):
                    bad.append(f"{name}:{node.lineno}")
    assert not bad, "function-level imports of softdimo_jax (import at the top; a cycle means a layering problem): " + ", ".join(bad)


@pytest.mark.parametrize("config_file", sorted(p.name for p in (PKG.parent / "configs").glob("*.py")
                                               if p.name not in ("__init__.py", "maskbit.py")))
def test_every_config_names_a_registered_pipeline(config_file):
    """`python -m softdimo_jax.main --config=configs/X.py` runs config.pipeline."""
    import importlib.util

    from softdimo_jax.pipelines.registry import PIPELINES

    spec = importlib.util.spec_from_file_location(config_file[:-3], PKG.parent / "configs" / config_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.get_config().pipeline in PIPELINES
