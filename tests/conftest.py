import mlx.core as mx
import pytest

import fused_moe as fm


def _backends():
    # Every kernel case runs on each backend present. The Metal kernels and
    # their Linux emulator come with their own issue; until then GPU
    # evaluation raises (tested in test_errors.py).
    return ["cpu"]


@pytest.fixture(params=_backends())
def device(request):
    return {"cpu": mx.cpu}[request.param]


def pytest_report_header(config):
    return f"fused_moe {fm.__version__}, CPU kernels: {fm.cpu_isa()}, threads: {fm.get_num_threads()}"
