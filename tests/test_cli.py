"""The ``fused-moe`` command line: generate and server, run as users run them."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fused_moe.demo import PROMPT
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


# ---------------------------------------------------------------- errors: one line, exit 1


def _one_line_error(result, command: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"fused-moe {command}: error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("command", ["generate", "server"])
def test_a_missing_model_path_is_one_line(command, tmp_path):
    args = ["--prompt", "x"] if command == "generate" else ["--port", str(_free_port())]
    result = run(str(FUSED_MOE), command, "--model", str(tmp_path / "nope"), *args, timeout=120)
    line = _one_line_error(result, command)
    assert f"{tmp_path / 'nope'}: no such directory" in line


def test_a_hub_id_while_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([str(FUSED_MOE), "generate", "--model", "some-org/some-model", "--prompt", "x"],
                            capture_output=True, text=True, timeout=120, env=env)
    line = _one_line_error(result, "generate")
    assert "some-org/some-model" in line and "offline" in line and "huggingface-cli download" in line


def test_an_unconverted_source_suggests_the_conversion(tmp_path):
    from support.hf_checkpoints import write_hf_checkpoint

    src = write_hf_checkpoint(tmp_path / "hf", fp8=True)
    result = run(str(FUSED_MOE), "generate", "--model", str(src), "--prompt", "x", timeout=120)
    line = _one_line_error(result, "generate")
    assert "Hugging Face" in line and f"fused-moe convert {src} {src}-fused --recipe seed-3.7bit" in line


def test_debug_shows_the_traceback(tmp_path):
    result = run(str(FUSED_MOE), "generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--debug",
                 timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_server_on_a_bad_path_exits_instead_of_listening(tmp_path):
    port = _free_port()
    server = subprocess.Popen([str(FUSED_MOE), "server", "--model", str(tmp_path / "nope"), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = server.communicate(timeout=120)
    finally:
        server.kill()
    assert server.returncode == 1, err
    assert err.strip().splitlines() == [f"fused-moe server: error: {tmp_path / 'nope'}: no such directory"], err
    with socket.socket() as s:  # nothing was listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_server_lists_its_model(model_dir, tmp_path):
    port = _free_port()
    # An empty Hugging Face cache: mlx-lm's scan of it used to fail after
    # answering 200, leaving the client an empty body.
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"))
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([str(FUSED_MOE), "server", "--model", str(model_dir), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
                    body = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [str(Path(model_dir).resolve())]
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_version_and_plain_help():
    version = run(str(FUSED_MOE), "--version")
    import fused_moe

    assert version.returncode == 0 and version.stdout.strip() == f"fused-moe {fused_moe.__version__}"
    for args in ([], ["convert"], ["generate"], ["server"]):
        result = run(str(FUSED_MOE), *args, "--help")
        assert result.returncode == 0, result.stderr
        assert "``" not in result.stdout and ":func:" not in result.stdout, result.stdout


def test_demo_converts_generates_and_serves(tmp_path):
    """The demo's four steps, kept in --dir: the packed checkpoint loads, and
    the server answers greedily with the text generate produced."""
    result = run(str(FUSED_MOE), "demo", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    # Both are printed as Python reprs.
    generated = re.search(re.escape(repr(PROMPT)) + r" -> (.+)\n", result.stdout)
    served = re.search(r"the server answered (.+)\n", result.stdout)
    assert generated and served, result.stdout
    assert served.group(1) == generated.group(1)
    packed = tmp_path / "minimax-tiny-packed"
    assert json.loads((packed / "config.json").read_text())["fused_moe"]["format_version"] == 2
