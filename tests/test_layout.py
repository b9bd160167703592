"""The package's layering (docs/architecture.md): each sub-package imports
only from the layers below it, no function-local import of the package's own
modules dodges a cycle, and `import fused_moe` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "fused_moe"

# Lowest first; a module may import from its own layer and those before it.
LAYERS = [
    {"fused_moe._version", "fused_moe._ext", "fused_moe.errors", "fused_moe.supported"},
    {"fused_moe.packed"},
    {"fused_moe.ops"},
    {"fused_moe.checkpoint"},
    {"fused_moe.quant"},
    {"fused_moe.models"},
    {"fused_moe.conversion"},
    {"fused_moe.doctor", "fused_moe.demo"},
    {"fused_moe.cli"},
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} belongs to no layer of {LAYERS}")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        yield name, ast.parse(path.read_text(), str(path))


def _package_imports(node: ast.AST, module: str):
    """(line, imported module) of every import of this package under `node`."""
    package = module if (PACKAGE.parent / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: resolve against this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - n.level + 1] + ([base] if base else []))
            if base == "fused_moe":
                for alias in n.names:
                    yield n.lineno, f"fused_moe.{alias.name}"
            elif base.startswith("fused_moe."):
                yield n.lineno, base
        elif isinstance(n, ast.Import):
            for alias in n.names:
                if alias.name.startswith("fused_moe."):
                    yield n.lineno, alias.name


def test_no_import_runs_back_up():
    bad = []
    for module, tree in _modules():
        if module in ("fused_moe", "fused_moe.__main__"):
            continue  # the top: the lazy table and `python -m fused_moe`
        own = _layer(module)
        for line, imported in _package_imports(tree, module):
            if _layer(imported) > own:
                bad.append(f"{module}:{line} imports {imported}")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_function_local_import_of_the_package():
    bad = []
    for module, tree in _modules():
        if module == "fused_moe":
            continue  # the lazy public names and the thread controls
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for line, imported in _package_imports(fn, module):
                    bad.append(f"{module}:{line} imports {imported} inside {fn.name}()")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("code", ["import fused_moe", "import fused_moe.cli"])
def test_importing_the_package_loads_neither_mlx_lm_nor_the_converter(code):
    check = (f"{code}\nimport sys\n"
             "heavy = [m for m in ('mlx_lm', 'fused_moe._ext', 'fused_moe.conversion', 'transformers') "
             "if m in sys.modules]\nprint(heavy)")
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_public_names_resolve():
    import fused_moe as fm

    for name in fm.__all__:
        assert getattr(fm, name) is not None, name
    assert callable(fm.convert) and callable(fm.patch) and callable(fm.load)
