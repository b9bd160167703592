"""The checks of what Apple's compilers will see (tests/tools/msl_checks): each
passes on the shipped code and fails on a planted error, so none of them can
pass vacuously.

They need clang, llvm-nm and libc++ (Debian: clang-19 llvm-19
libc++-19-dev; .ci/run installs them) and, for check c, the macOS
mlx-metal wheel from PyPI. Elsewhere they skip naming what is missing; under
CI (CI=true) a missing tool is a failure, so the checks cannot silently not
run there."""

import os
from pathlib import Path

import pytest

from tools import msl_checks
from tools.metal_kernels import covering_kernels
from tools.msl_checks import CheckFailed
from fused_moe import _ext

ROOT = Path(__file__).resolve().parents[1]


def _require(what: str, ok: bool):
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing under CI; .ci/run installs it")
        pytest.skip(f"{what} not available")


@pytest.fixture(scope="module")
def clang():
    _require("clang++ (FUSED_MOE_CLANG or clang++-19)", msl_checks.clang() is not None)


@pytest.fixture(scope="module")
def source():
    return _ext.metal_source()


@pytest.fixture(scope="module")
def bodies(source):
    """The shipped source without its instantiation block: the kernel
    templates uninstantiated, a small AST for the planted errors."""
    begin = source.index("// fused_moe:instantiations-begin\n")
    end = source.index("// fused_moe:instantiations-end")
    return source[:begin] + source[end:]


@pytest.fixture(scope="module")
def subset():
    """A covering subset of the allow-list (every activation, variant, dtype
    and quantization) and its source: the AST of all 1152 kernels would be
    gigabytes."""
    kernels = covering_kernels()
    return kernels, msl_checks.subset_source(kernels)


# ---- a and b: the strict compile and the lint, on the shipped source.


def test_covering_subset_passes_strict_compile_and_lint(clang, subset, tmp_path):
    kernels, src = subset
    compiled = msl_checks.check_source(src, tmp_path, kernels)
    assert compiled.host_names == kernels
    for piece in ("gate_up_situ_", "gate_up_relu2_", "_nvfp4", "_mxfp8", "_b5_gs", "down_prefill_"):
        assert any(piece in k for k in kernels), piece


def test_every_kernel_passes_strict_compile(clang, source, tmp_path):
    """Check a on the whole allow-list as shipped, in chunks side by side
    (about 20 s)."""
    assert msl_checks.strict_compile_all(source, tmp_path) == list(_ext.metal_kernel_names())


@pytest.mark.slow
def test_every_kernel_passes_strict_compile_and_lint(clang, source, tmp_path):
    """Checks a and b with every kernel of the allow-list instantiated, the
    lint on each chunk's AST (minutes: CI runs it, and python -m
    tests.tools.msl_checks)."""
    assert msl_checks.check_shipped(tmp_path, source) == list(_ext.metal_kernel_names())


# Planted errors: appended to the shipped source, each must fail the checks
# with the named complaint.
STRICT_PLANTS = {
    # a device pointer where the helper takes a thread pointer
    "device_to_thread": (
        "inline float fm_planted(device const float* x) {\n"
        "  return fused_moe_kernels::masked_dot<3>(x, fused_moe_kernels::LaneCodes{});\n}\n",
        "cannot pass pointer to address space '1' as a pointer to generic address space"),
    # a threadgroup pointer where a device pointer is expected
    "threadgroup_to_device": (
        "inline float fm_read(device const float* p) { return p[0]; }\n"
        "inline float fm_planted() {\n"
        "  FM_THREADGROUP_ARRAY(float, tg, 4);\n  return fm_read(tg);\n}\n",
        "no matching function for call to 'fm_read'"),
    "cxx17": ("inline int fm_planted() { if constexpr (true) { return 1; } return 0; }\n",
              "constexpr if is a C++17 extension"),
    "pedantic": ("inline int fm_planted() { int n = 3; int v[n]; v[0] = 1; return v[0]; }\n",
                 "variable length arrays"),
    "throw": ("inline int fm_planted(int a) { if (a) { throw 1; } return a; }\n",
              "exceptions disabled"),
}


@pytest.mark.parametrize("plant", sorted(STRICT_PLANTS))
def test_strict_compile_fails_on_planted_error(plant, clang, bodies, tmp_path):
    snippet, message = STRICT_PLANTS[plant]
    with pytest.raises(CheckFailed, match="address-space-strict compile failed") as e:
        msl_checks.strict_compile(bodies + snippet, tmp_path, [])
    assert message in str(e.value)


def test_strict_compile_fails_when_a_kernel_is_not_instantiated(clang, subset, source, tmp_path):
    kernels, src = subset
    with pytest.raises(CheckFailed, match=r"missing \['an_extra_kernel'\]"):
        msl_checks.strict_compile(src, tmp_path, [*kernels, "an_extra_kernel"])
    cut = source.replace("FM_FOR_EACH_ROUTE_KERNEL(FM_INSTANTIATE_ROUTE)\n", "")
    with pytest.raises(CheckFailed, match=r"missing \['route_float16_gate_float16'"):
        msl_checks.strict_compile_all(cut, tmp_path)


# name: (snippet, the rule the lint must report)
LINT_PLANTS = {
    "lambda": ("inline int fm_planted() { auto f = [](int a) { return a; }; return f(1); }\n", "lambda"),
    "goto": ("inline int fm_planted(int a) { if (a) { goto done; } a = 1; done: return a; }\n", "goto"),
    "new": ("struct FmPlanted { int v; };\ninline FmPlanted* fm_planted() { return new FmPlanted; }\n",
            "new"),
    "delete": ("struct FmPlanted { int v; };\ninline void fm_planted(FmPlanted* p) { delete p; }\n",
               "delete"),
    "double": ("inline float fm_planted(float x) { return x * 2.0; }\n", "double"),
    "virtual": ("struct FmPlanted { virtual int f() const thread { return 1; } };\n", "virtual"),
    "thread_local": ("thread_local int fm_planted = 0;\n", "thread_local"),
    "recursion": ("inline int fm_planted(int n) { return n ? fm_planted(n - 1) : 0; }\n", "recursion"),
    # through a forward declaration and a template
    "recursion_mutual": (
        "inline int fm_b(int n);\n"
        "template <int N> inline int fm_a(int n) { return n ? fm_b(n - 1) : N; }\n"
        "inline int fm_b(int n) { return fm_a<2>(n); }\n", "recursion"),
    "thread_qualifier": ("struct FmPlanted { int v; int get() const { return v; } };\n",
                         "thread qualifier"),
}
# throw and try are compile errors under -fno-exceptions (above); the lint's
# own rules for them are checked on a compile with exceptions on.
EXCEPTION_PLANTS = {
    "throw": "inline int fm_planted(int a) { if (a) { throw 1; } return a; }\n",
    "try": "inline int fm_planted(int a) { try { return a; } catch (...) { return 0; } }\n",
}


def test_lint_is_clean_on_the_kernel_templates(clang, bodies, tmp_path):
    assert msl_checks.lint(msl_checks.strict_compile(bodies, tmp_path, [])) == []


@pytest.mark.parametrize("plant", sorted(LINT_PLANTS))
def test_lint_fails_on_planted_construct(plant, clang, bodies, tmp_path):
    snippet, rule = LINT_PLANTS[plant]
    planted = bodies + snippet
    violations = msl_checks.lint(msl_checks.strict_compile(planted, tmp_path, []))
    # Reported under its rule, at the planted lines (after the shipped ones).
    first_planted = len(bodies.splitlines()) + 1
    assert rule in {v.rule for v in violations if v.line >= first_planted}, violations


def test_check_source_raises_on_a_lint_violation(clang, subset, tmp_path):
    kernels, src = subset
    with pytest.raises(CheckFailed, match=r"MSL lint: 1 violation\(s\):\n.*: goto: GotoStmt"):
        msl_checks.check_source(src + LINT_PLANTS["goto"][0], tmp_path, kernels)


def test_strict_compile_all_fails_on_a_planted_error(clang, subset, tmp_path):
    """The chunked compile (strict_compile_all, which checks the whole
    allow-list) compiles the subset clean and reports a planted error (a
    device pointer passed as a thread one)."""
    kernels, src = subset
    assert msl_checks.strict_compile_all(src, tmp_path, kernels, chunks=2) == kernels
    planted = src.replace("// fused_moe:instantiations-begin", STRICT_PLANTS["device_to_thread"][0]
                          + "// fused_moe:instantiations-begin")
    with pytest.raises(CheckFailed, match="address-space-strict compile failed(.|\n)*cannot pass pointer"):
        msl_checks.strict_compile_all(planted, tmp_path, kernels, chunks=2)
    # and, with the lint, a lint violation (found in each chunk, told once)
    planted = src.replace("// fused_moe:instantiations-begin", LINT_PLANTS["goto"][0]
                          + "// fused_moe:instantiations-begin")
    with pytest.raises(CheckFailed, match=r"MSL lint: 1 violation\(s\):\n.*: goto: GotoStmt"):
        msl_checks.strict_compile_all(planted, tmp_path, kernels, chunks=2, with_lint=True)


@pytest.mark.parametrize("rule", sorted(EXCEPTION_PLANTS))
def test_lint_rejects_exceptions(rule, clang, bodies, tmp_path, monkeypatch):
    monkeypatch.setattr(msl_checks, "STRICT_FLAGS",
                        [f for f in msl_checks.STRICT_FLAGS if f != "-fno-exceptions"] + ["-fexceptions"])
    compiled = msl_checks.strict_compile(bodies + EXCEPTION_PLANTS[rule], tmp_path, [])
    assert rule in {v.rule for v in msl_checks.lint(compiled)}


# ---- c: the Metal host code against MLX's macOS headers and libmlx.dylib.


@pytest.fixture(scope="module")
def macos_wheel(request):
    _require("llvm-nm (FUSED_MOE_LLVM_NM or llvm-nm-19)", msl_checks.llvm_nm() is not None)
    _require("clang++", msl_checks.clang() is not None)
    _require("libc++ headers (libc++-19-dev)", Path("/usr/lib/llvm-19/include/c++/v1").is_dir()
             or os.environ.get("FUSED_MOE_CLANG") is not None)
    cache = Path(request.config.cache.mkdir("msl_checks"))
    try:
        return msl_checks.macos_wheel(cache)
    except CheckFailed as e:
        _require(f"the macOS mlx-metal wheel ({e})", False)


def test_host_code_against_macos_headers(macos_wheel, tmp_path):
    symbols = msl_checks.check_host_code(macos_wheel, tmp_path)
    # The calls the run-time compile path rests on are among those checked.
    for needed in ("mlx::core::metal::Device::get_library(", "mlx::core::metal::Device::get_kernel(",
                   "mlx::core::metal::get_command_encoder(", "mlx::core::metal::device("):
        assert any(s.startswith(needed) for s in symbols), needed


def _planted_copy(tmp_path, old, new):
    src = ROOT / "csrc" / "metal" / "eval_gpu.cpp"
    text = src.read_text()
    assert old in text
    planted = tmp_path / "planted" / "eval_gpu.cpp"
    planted.parent.mkdir()
    planted.write_text(text.replace(old, new, 1))
    return planted


def test_host_check_fails_on_a_type_error(macos_wheel, tmp_path):
    # The arguments swapped: no get_kernel takes a library first.
    planted = _planted_copy(tmp_path, "device.get_kernel(kernel, library)",
                            "device.get_kernel(library, kernel)")
    with pytest.raises(CheckFailed, match="no matching member function for call to 'get_kernel'"):
        msl_checks.check_host_code(macos_wheel, tmp_path / "work", [planted])


def test_host_check_fails_on_a_symbol_the_dylib_does_not_export(macos_wheel, tmp_path):
    # Declared in device.h without MLX_API: it compiles, but would not link.
    planted = _planted_copy(tmp_path, "  auto& encoder = mx::metal::get_command_encoder(stream);",
                            "  (void)mx::metal::get_command_encoders();\n"
                            "  auto& encoder = mx::metal::get_command_encoder(stream);")
    with pytest.raises(CheckFailed, match=r"does not export:\nmlx::core::metal::get_command_encoders\(\)"):
        msl_checks.check_host_code(macos_wheel, tmp_path / "work", [planted])
