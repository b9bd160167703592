"""The ``fused-moe`` command line: generate and server, run as users run them."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support.minimax_models import SMALL, build_model, save_checkpoint

# The console script pip installs beside this interpreter.
FUSED_MOE = Path(sys.executable).parent / "fused-moe"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, config = build_model(SMALL, seed=7)
    return save_checkpoint(model, config, tmp_path_factory.mktemp("cli") / "stock")


def run(*args, timeout=300):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("entry", ["console_script", "python_m"])
def test_generate_prints_text_and_speed(model_dir, entry):
    prefix = [str(FUSED_MOE)] if entry == "console_script" else [sys.executable, "-m", "fused_moe"]
    result = run(*prefix, "generate", "--model", str(model_dir), "--prompt", "Hello world", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    # mlx-lm's own summary lines.
    assert "Prompt: " in result.stdout and "Generation: 8 tokens" in result.stdout, result.stdout
    assert "tokens-per-sec" in result.stdout


def test_generate_requires_a_model():
    result = run(sys.executable, "-m", "fused_moe", "generate", "--prompt", "x")
    assert result.returncode == 2
    assert "--model" in result.stderr


def test_unknown_command_is_an_error():
    result = run(sys.executable, "-m", "fused_moe", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_on_a_patched_model(model_dir, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(
        [str(FUSED_MOE), "server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": "Hello", "max_tokens": 5, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"server exited: {(tmp_path / 'server.log').read_text()}"
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    body = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    # The model it served ran on the fused layers.
    assert "fused_moe: 3 MoE blocks run on the fused kernels" in (tmp_path / "server.log").read_text()
