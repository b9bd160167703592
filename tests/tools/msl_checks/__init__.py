"""Checks, on Linux, of what Apple's compilers will see (issue 13).

a. ``strict_compile``: the embedded Metal source (``_ext.metal_source()``)
   compiled by clang as C++14, the base of MSL 3.x, against
   ``include/metal_stdlib``, where ``device``, ``constant`` and
   ``threadgroup`` are distinct address spaces. ``-pedantic-errors``,
   ``-fno-exceptions``, ``-fno-rtti``, C++17 extensions and warnings are
   errors, and every kernel of the allow-list must be instantiated.
   ``strict_compile_all`` does it for the whole allow-list (over a thousand
   kernels) in chunks compiled side by side, without the AST.
b. ``lint``: reads the clang AST of a strict compile and rejects what MSL
   forbids: lambdas, goto, new/delete, throw/try, double, virtual,
   thread_local, recursion; and member functions without the ``thread``
   qualifier that MSL 4.1 needs (``this`` is generic there). The AST of
   every kernel at once would be gigabytes of JSON: ``check_shipped`` lints
   the chunks of ``strict_compile_all`` one by one (CI and
   ``python -m tests.tools.msl_checks``), the everyday tests a covering
   subset (``tools.metal_kernels.covering_kernels``: every activation,
   variant, dtype and quantization).
c. ``check_host_code``: the Metal host code (``csrc/metal/*.cpp`` and every
   csrc file built only with Metal) type-checked with
   ``clang++ -fsyntax-only -fblocks`` against MLX's real macOS headers from
   the ``mlx-metal`` wheel of the pinned MLX, with ``apple_stubs/`` standing
   in for the Apple system headers; then compiled to objects, and every
   ``mlx::`` symbol they reference must be exported by that wheel's
   ``libmlx.dylib`` (``llvm-nm``).

Each check raises ``CheckFailed`` with the tool's output. Run all three
with ``python -m tests.tools.msl_checks``; ``tests/test_msl_checks.py`` runs them
and plants an error for each. What they cannot tell: whether Apple's Metal
compiler accepts every construct (its rules are larger than these), and
anything about running the kernels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..metal_kernels import source_of as subset_source  # noqa: F401 (the tests' name for it)
from ..metal_kernels import split_source

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
STRICT_INCLUDE = HERE / "include"
APPLE_STUBS = HERE / "apple_stubs"
# The file name the source string is compiled under, so that errors point
# at the embedded translation unit, not at a file of the checkout.
SOURCE_NAME = "fused_moe_embedded.metal"

STRICT_FLAGS = [
    "-std=c++14", "-fsyntax-only", "-pedantic-errors", "-fno-exceptions",
    "-fno-rtti", "-Werror=c++17-extensions", "-Wall", "-Werror",
    # [[buffer(n)]], [[kernel]] and friends mean nothing to clang.
    "-Wno-unknown-attributes",
    # The host names of the instantiations, kept only for the lint.
    "-Wno-unused-const-variable",
    # The Metal branches of args.h and tile_shapes.h, as Apple compiles them.
    "-D__METAL_VERSION__=310",
    "-nostdinc", "-nostdinc++",
]


class CheckFailed(RuntimeError):
    """A check found an error; the message holds the tool's output."""


def find_tool(env: str, *names: str) -> str | None:
    """$env if set, else the first of `names` on PATH."""
    if os.environ.get(env):
        return os.environ[env]
    for n in names:
        if shutil.which(n):
            return n
    return None


def clang() -> str | None:
    return find_tool("FUSED_MOE_CLANG", "clang++-19", "clang++")


def llvm_nm() -> str | None:
    return find_tool("FUSED_MOE_LLVM_NM", "llvm-nm-19", "llvm-nm")


def embedded_source() -> str:
    from fused_moe import _ext

    return _ext.metal_source()


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- check a


@dataclass
class StrictCompile:
    source: str
    ast: dict
    host_names: list[str]  # the kernels instantiated, in order


def strict_compile(source: str, workdir: Path, expected_kernels: list[str] | None = None) -> StrictCompile:
    """Check a, with the AST for the lint. `expected_kernels` (default: the
    extension's allow-list) must be exactly the kernels the source
    instantiates."""
    cc = clang()
    if cc is None:
        raise CheckFailed("no clang++ found (install clang-19, or set FUSED_MOE_CLANG)")
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / SOURCE_NAME
    path.write_text(source)
    cmd = [cc, *STRICT_FLAGS, "-isystem", str(STRICT_INCLUDE), "-x", "c++", str(path),
           "-Xclang", "-ast-dump=json"]
    proc = _run(cmd)
    if proc.returncode != 0:
        raise CheckFailed(f"address-space-strict compile failed ({' '.join(cmd)}):\n{proc.stderr[-12000:]}")
    ast = json.loads(proc.stdout)
    names = _host_names(ast)
    if expected_kernels is None:
        from fused_moe import _ext

        expected_kernels = list(_ext.metal_kernel_names())
    _check_instantiated(names, expected_kernels)
    return StrictCompile(source, ast, names)


def _check_instantiated(names: list[str], expected_kernels: list[str]) -> None:
    missing = [k for k in expected_kernels if k not in set(names)]
    extra = [k for k in names if k not in set(expected_kernels)]
    if missing or extra:
        raise CheckFailed(
            "the source does not instantiate exactly the allow-list: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"not in the allow-list {extra[:8]} ({len(extra)})")


# A host-name constant in preprocessed output: adjacent string literals
# (FM_STR pieces), joined by the compiler later.
HOST_NAME = re.compile(r'fm_msl_host_name_\d+\[\]\s*=\s*((?:"[^"]*"\s*)+);')


def strict_compile_all(source: str, workdir: Path, expected_kernels: list[str] | None = None,
                       chunks: int = 16, jobs: int | None = None, with_lint: bool = False) -> list[str]:
    """Check a (and with `with_lint` check b) on a source whose instantiation
    block expands to many kernels: the block's expansion is split into
    `chunks` sources compiled `jobs` at a time, each with the whole head,
    so each chunk's AST (when linted) holds the templates and its share of
    the instantiations; the AST of the whole allow-list at once would be
    gigabytes. The host names come from the preprocessor's output. Returns
    them."""
    cc = clang()
    if cc is None:
        raise CheckFailed("no clang++ found (install clang-19, or set FUSED_MOE_CLANG)")
    workdir.mkdir(parents=True, exist_ok=True)
    head, block, tail = split_source(source)
    # The block's macros expanded, one instantiation per line, in order.
    probe = workdir / "expand.metal"
    probe.write_text(head + "fm_msl_block_begin\n" + block + "fm_msl_block_end\n" + tail)
    flags = [f for f in STRICT_FLAGS if f != "-fsyntax-only"]
    proc = _run([cc, *flags, "-isystem", str(STRICT_INCLUDE), "-x", "c++", "-E", "-P", str(probe)])
    if proc.returncode != 0:
        raise CheckFailed(f"preprocessing the embedded source failed:\n{proc.stderr[-12000:]}")
    expanded = proc.stdout.split("fm_msl_block_begin", 1)[1].split("fm_msl_block_end", 1)[0]
    names = ["".join(re.findall(r'"([^"]*)"', m)) for m in HOST_NAME.findall(expanded)]
    if expected_kernels is None:
        from fused_moe import _ext

        expected_kernels = list(_ext.metal_kernel_names())
    _check_instantiated(names, expected_kernels)
    # One instantiation (and its host-name constant) per `template` statement.
    items = [i for i in re.split(r"(?=\btemplate decltype\()", expanded) if i.strip()]
    size = -(-len(items) // max(1, chunks))
    parts = ["".join(items[i:i + size]) for i in range(0, len(items), size)]

    def check_part(i: int) -> list[Violation]:
        path = workdir / f"part{i}_{SOURCE_NAME}"
        text = head + parts[i] + tail
        path.write_text(text)
        cmd = [cc, *STRICT_FLAGS, "-isystem", str(STRICT_INCLUDE), "-x", "c++", str(path)]
        proc = _run(cmd + (["-Xclang", "-ast-dump=json"] if with_lint else []))
        if proc.returncode != 0:
            raise CheckFailed(f"address-space-strict compile failed ({' '.join(cmd)}):\n{proc.stderr[-12000:]}")
        if not with_lint:
            return []
        ast = json.loads(proc.stdout)
        return lint(StrictCompile(text, ast, _host_names(ast)))

    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        violations = sorted({v for found in pool.map(check_part, range(len(parts))) for v in found},
                            key=lambda v: (v.line, v.rule))
    raise_on_violations(violations)
    return names


def _host_names(ast: dict) -> list[str]:
    """The string of every fm_msl_host_name_N the strict header's
    FM_INSTANTIATE_KERNEL declares, in declaration order."""
    out = []
    for node in ast.get("inner", []):
        if node.get("kind") == "VarDecl" and node.get("name", "").startswith("fm_msl_host_name_"):
            lit = _first(node, "StringLiteral")
            if lit is not None:
                out.append(json.loads(lit["value"]))
    return out


def _first(node: dict, kind: str) -> dict | None:
    for c in node.get("inner", []):
        if c.get("kind") == kind:
            return c
        found = _first(c, kind)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- check b

FORBIDDEN_NODES = {
    "LambdaExpr": "lambda",
    "GotoStmt": "goto",
    "IndirectGotoStmt": "goto",
    "CXXNewExpr": "new",
    "CXXDeleteExpr": "delete",
    "CXXThrowExpr": "throw",
    "CXXTryStmt": "try",
}
DOUBLE = re.compile(r"\bdouble\b")


@dataclass(frozen=True)
class Violation:
    rule: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{SOURCE_NAME}:{self.line}: {self.rule}: {self.what}"


class _Walker:
    """Walks clang's JSON AST in dump order, keeping the current line (the
    dump omits a location's line when it repeats the previous one)."""

    def __init__(self, source_lines: list[str]):
        self.lines = source_lines
        self.line = 0
        self.in_source = False
        self.node_line = 0
        self.node_in_source = False
        self.violations: set[Violation] = set()
        self.calls: dict[str, set[str]] = {}
        self.fn_names: dict[str, tuple[str, int]] = {}
        # A redeclaration's id -> the first declaration's, so that a call
        # through a forward declaration meets the definition.
        self.first_decl: dict[str, str] = {}

    def canonical(self, decl_id: str) -> str:
        while decl_id in self.first_decl:
            decl_id = self.first_decl[decl_id]
        return decl_id

    def _loc(self, loc: dict | None) -> None:
        if not loc:
            return
        if "spellingLoc" in loc:
            self._loc(loc["spellingLoc"])
            self._loc(loc.get("expansionLoc"))
            return
        if "file" in loc:
            self.in_source = loc["file"].endswith(SOURCE_NAME)
        if "line" in loc:
            self.line = loc["line"]

    def add(self, rule: str, what: str) -> None:
        if self.node_in_source:
            n = self.node_line
            text = self.lines[n - 1].strip() if 0 < n <= len(self.lines) else ""
            self.violations.add(Violation(rule, n, f"{what} -- {text}"))

    def walk(self, node: dict, fn: str | None = None) -> None:
        self._loc(node.get("loc"))
        rng = node.get("range") or {}
        self._loc(rng.get("begin"))
        # Reported at the node's start; the walk goes on from its end, the
        # location the dump printed last.
        self.node_line, self.node_in_source = self.line, self.in_source
        self._loc(rng.get("end"))
        kind = node.get("kind", "")
        kind_is_user = not node.get("isImplicit")
        if kind in FORBIDDEN_NODES:
            self.add(FORBIDDEN_NODES[kind], kind)
        qual = (node.get("type") or {}).get("qualType", "")
        if kind_is_user and DOUBLE.search(qual) and kind != "TypedefDecl":
            self.add("double", f"{kind} of type '{qual}'")
        if kind == "VarDecl" and node.get("tls"):
            self.add("thread_local", f"variable '{node.get('name')}'")
        if kind in ("CXXMethodDecl", "CXXConstructorDecl", "CXXDestructorDecl", "CXXConversionDecl"):
            if node.get("virtual"):
                self.add("virtual", f"{kind} '{node.get('name')}'")
        if kind == "CXXRecordDecl":
            for base in node.get("bases", []):
                if base.get("isVirtual"):
                    self.add("virtual", f"virtual base of '{node.get('name')}'")
        if kind == "CXXMethodDecl" and kind_is_user and node.get("storageClass") != "static":
            annotated = any(c.get("kind") == "AnnotateAttr" for c in node.get("inner", []))
            if not annotated:
                self.add("thread qualifier",
                         f"member function '{node.get('name')}' has no `thread` after its "
                         "parameter list (MSL 4.1: `this` is generic)")
        if kind in ("FunctionDecl", "CXXMethodDecl", "CXXConstructorDecl") and "id" in node:
            if "previousDecl" in node:
                self.first_decl[node["id"]] = node["previousDecl"]
            fn = self.canonical(node["id"])
            self.fn_names.setdefault(fn, (node.get("name", "?"), self.node_line))
            self.calls.setdefault(fn, set())
        if kind == "DeclRefExpr" and fn is not None:
            ref = node.get("referencedDecl") or {}
            if ref.get("kind") in ("FunctionDecl", "CXXMethodDecl"):
                self.calls[fn].add(ref["id"])
        if kind == "MemberExpr" and fn is not None and node.get("referencedMemberDecl"):
            self.calls[fn].add(node["referencedMemberDecl"])
        for child in node.get("inner", []):
            self.walk(child, fn)


def lint(compiled: StrictCompile) -> list[Violation]:
    """Check b over the AST of `compiled`; [] when the source is clean."""
    w = _Walker(compiled.source.splitlines())
    w.walk(compiled.ast)
    calls = {f: {w.canonical(c) for c in callees} for f, callees in w.calls.items()}
    for cycle in _cycles(calls):
        names = " -> ".join(w.fn_names.get(f, (f, 0))[0] for f in cycle)
        w.violations.add(Violation("recursion", w.fn_names.get(cycle[0], ("", 0))[1], names))
    return sorted(w.violations, key=lambda v: (v.line, v.rule))


def _cycles(calls: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the call graph that calls
    itself (iterative DFS: the graph of 90 kernels is deep enough)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {f: WHITE for f in calls}
    found = []
    for root in calls:
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(calls[root])))]
        path = [root]
        colour[root] = GREY
        while stack:
            f, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[f] = BLACK
                stack.pop()
                path.pop()
                continue
            if nxt not in calls:
                continue  # a declaration without a body (the MSL builtins)
            if colour[nxt] == GREY:
                found.append(path[path.index(nxt):] + [nxt])
            elif colour[nxt] == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, iter(sorted(calls[nxt]))))
                path.append(nxt)
    return found


def check_source(source: str, workdir: Path, expected_kernels: list[str] | None = None) -> StrictCompile:
    """Checks a and b on one source string (instantiating exactly
    `expected_kernels`, default the allow-list); raises CheckFailed."""
    compiled = strict_compile(source, workdir, expected_kernels)
    raise_on_violations(lint(compiled))
    return compiled


def raise_on_violations(violations: list[Violation]) -> None:
    if violations:
        raise CheckFailed("MSL lint: " + str(len(violations)) + " violation(s):\n"
                          + "\n".join(map(str, violations)))


def check_shipped(workdir: Path, source: str | None = None) -> list[str]:
    """Checks a and b on the shipped source, every kernel of the allow-list
    instantiated (strict_compile_all with the lint, in chunks); returns the
    kernels checked."""
    source = embedded_source() if source is None else source
    return strict_compile_all(source, workdir, with_lint=True)


# ---------------------------------------------------------------- check c


def macos_wheel(cache_dir: Path) -> Path:
    """The include/ and lib/ of the macOS mlx-metal wheel of the installed
    (pinned) MLX, downloaded once with pip and unpacked under cache_dir."""
    version = metadata.version("mlx")
    root = Path(cache_dir) / f"mlx-metal-{version}"
    if (root / "mlx" / "lib" / "libmlx.dylib").is_file():
        return root / "mlx"
    wheels = Path(cache_dir) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"mlx_metal-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", "macosx_14_0_arm64", f"mlx-metal=={version}", "-d", str(wheels)]
        proc = _run(cmd)
        found = sorted(wheels.glob(f"mlx_metal-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise CheckFailed(f"could not download the macOS wheel ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    tmp = root.with_name(root.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(found[-1]) as z:
        members = [m for m in z.namelist()
                   if m.startswith("mlx/include/") or m == "mlx/lib/libmlx.dylib"]
        z.extractall(tmp, members)
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return root / "mlx"


def metal_host_sources() -> list[Path]:
    """csrc/metal/*.cpp and every other csrc file with Metal-only code."""
    files = sorted((ROOT / "csrc" / "metal").glob("*.cpp"))
    for f in sorted((ROOT / "csrc").rglob("*.cpp")):
        if f not in files and "FUSED_MOE_METAL" in f.read_text():
            files.append(f)
    return files


def _host_flags(wheel: Path, generated: Path) -> list[str]:
    from fused_moe import __version__

    return [
        "-std=c++20", "-stdlib=libc++", "-fblocks", "-fPIC",
        "-DFUSED_MOE_METAL=1", f'-DFUSED_MOE_VERSION="{__version__}"',
        "-isystem", str(APPLE_STUBS), "-isystem", str(wheel / "include"),
        "-isystem", str(wheel / "include" / "metal_cpp"),
        f"-I{ROOT}", f"-I{ROOT / 'csrc'}", f"-I{generated}",
    ]


def _normalise(demangled: str) -> str:
    # int64_t is `long long` on macOS and `long` on Linux x86-64, the only
    # difference between the two libc++ manglings our calls meet.
    return demangled.replace("long long", "long")


def _symbols(nm: str, args: list[str], path: Path) -> list[str]:
    proc = _run([nm, *args, "--demangle", "--format=just-symbols", str(path)])
    if proc.returncode != 0:
        raise CheckFailed(f"{nm} failed on {path}:\n{proc.stderr}")
    return [l.strip() for l in proc.stdout.splitlines() if l.strip()]


def check_host_code(wheel: Path, workdir: Path, sources: list[Path] | None = None) -> list[str]:
    """Check c; returns the mlx:: symbols checked. `sources` defaults to
    metal_host_sources()."""
    cc, nm = clang(), llvm_nm()
    if cc is None or nm is None:
        raise CheckFailed("check c needs clang++ and llvm-nm (install clang-19 llvm-19 libc++-19-dev)")
    workdir.mkdir(parents=True, exist_ok=True)
    generated = workdir / "generated"
    generated.mkdir(exist_ok=True)
    proc = _run([sys.executable, str(ROOT / "csrc" / "metal" / "embed_source.py"),
                 str(ROOT / "metal" / "fused_moe.metal"), str(generated / "fused_moe_metal_source.inc")])
    if proc.returncode != 0:
        raise CheckFailed(f"embedding the Metal source failed:\n{proc.stderr}")
    flags = _host_flags(wheel, generated)
    needed: set[str] = set()
    for src in sources or metal_host_sources():
        obj = workdir / (hashlib.sha256(str(src).encode()).hexdigest()[:12] + ".o")
        for cmd in ([cc, *flags, "-fsyntax-only", str(src)],
                    [cc, *flags, "-O0", "-c", str(src), "-o", str(obj)]):
            proc = _run(cmd)
            if proc.returncode != 0:
                raise CheckFailed(f"{src.name} against MLX's macOS headers ({' '.join(cmd)}):\n"
                                  f"{proc.stderr[-12000:]}")
        needed.update(s for s in _symbols(nm, ["--undefined-only"], obj) if s.startswith("mlx::"))
    exported = {_normalise(s.lstrip("_")) for s in
                _symbols(nm, ["--extern-only", "--defined-only"], wheel / "lib" / "libmlx.dylib")}
    missing = sorted(s for s in needed if _normalise(s) not in exported)
    if missing:
        raise CheckFailed("mlx:: symbols the Metal host code references but the macOS "
                          "libmlx.dylib does not export:\n" + "\n".join(missing))
    return sorted(needed)
