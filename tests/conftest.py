import mlx.core as mx
import pytest

import fused_moe as fm
from support.backends import METAL_MISSING, EmulatorBackend, StreamBackend, metal_available

# Every kernel case runs on each backend: the CPU kernels, the Metal kernels
# on a real GPU (skipped, naming the missing backend, where MLX has no Metal)
# and the same Metal kernels in the Linux emulator (tests/tools/metal_emulator/).
BACKENDS = ["cpu", "metal", "metal_emulator"]
GPU_BACKENDS = ["metal", "metal_emulator"]


@pytest.fixture(scope="session")
def metal_emulator(request, tmp_path_factory):
    from tools import metal_emulator

    if not metal_emulator.compiler_available():
        pytest.skip(
            f"metal_emulator backend not available: no C++ compiler "
            f"({metal_emulator.CXX}) to build tests/tools/metal_emulator"
        )
    # Kernels are built on their first run and cached here: pytest's cache
    # keeps them between runs; without it (-p no:cacheprovider), this session.
    cache_plugin = getattr(request.config, "cache", None)
    cache = cache_plugin.mkdir("metal_emulator") if cache_plugin else tmp_path_factory.mktemp("metal_emulator")
    return metal_emulator.Emulator(cache)


def _backend(request, name):
    if name == "cpu":
        return StreamBackend("cpu", mx.cpu)
    if name == "metal":
        if not metal_available():
            pytest.skip(METAL_MISSING)
        return StreamBackend("metal", mx.gpu)
    return EmulatorBackend(request.getfixturevalue("metal_emulator"))


@pytest.fixture(params=BACKENDS)
def device(request):
    """A backend offering gate_up_swiglu, down_combine and route."""
    return _backend(request, request.param)


@pytest.fixture(params=GPU_BACKENDS)
def gpu_device(request):
    """The Metal kernels: on the GPU, or in the emulator."""
    return _backend(request, request.param)


def pytest_report_header(config):
    return f"fused_moe {fm.__version__}, CPU kernels: {fm.cpu_isa()}, threads: {fm.get_num_threads()}"


@pytest.fixture(params=["cpu", "metal"])
def stream(request):
    """An MLX stream for the ops that have no fused_moe Metal kernel (the
    dense linears, attention): the CPU, and the GPU where MLX has Metal."""
    if request.param == "metal":
        if not metal_available():
            pytest.skip(METAL_MISSING)
        return mx.gpu
    return mx.cpu
