"""Tensor parallelism over H: two ranks through ``mlx.launch --backend ring``
on the loopback interface, against the single-process model, in float32."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import fused_moe as fm
from support.minimax_models import PROMPT, SMALL, build_model, save_checkpoint, tiny_llama
from support.tolerance import rel_err, slack

WORKER = Path(__file__).parent / "support" / "sharding_worker.py"
MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
PATHS = ("patch_after_shard", "shard_patched", "load_stock", "load_packed")
LAUNCH_TIMEOUT_S = 240


def _free_port_pair() -> int:
    # The ring backend listens on the starting port and the next one.
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def launch(*args: str, command=(sys.executable, str(WORKER))) -> subprocess.CompletedProcess:
    """Runs `command` (default: the worker) on 2 ranks; kills every rank and
    fails with a message if they do not finish in time (a hang must not hang
    the suite)."""
    cmd = [
        str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "-p", str(_free_port_pair()),
        "--", *command, *args,
    ]
    env = dict(os.environ, FUSED_MOE_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"2-rank run did not finish in {LAUNCH_TIMEOUT_S} s (a hang?)\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    model, config = build_model(SMALL, seed=11)
    stock = save_checkpoint(model, config, root / "stock")
    fm.convert(str(stock), str(root / "packed"))
    return stock, root / "packed"


@pytest.fixture(scope="module")
def single_process(checkpoints):
    model, _ = fm.load(str(checkpoints[0]))
    model.set_dtype(mx.float32)
    logits = model(mx.array([PROMPT]))
    tokens = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=16)]
    return np.array(logits), tokens


@pytest.mark.parametrize("path", PATHS)
def test_two_ranks_match_one_process(path, checkpoints, single_process, tmp_path):
    # One launch per path, as users run them: one sharded model per process.
    stock, packed = checkpoints
    result = launch(str(tmp_path), path, str(stock), str(packed))
    ref_logits, ref_tokens = single_process
    for rank in (0, 1):
        report = tmp_path / f"{path}.rank{rank}.npz"
        assert report.exists(), f"rank {rank} wrote no result\n{result.stdout}\n{result.stderr}"
        got = np.load(report)
        assert int(got["ranks"]) == 2
        err = rel_err(got["logits"], ref_logits)
        assert err <= slack(mx.float32), f"{path}, rank {rank}: logits rel err {err:.3g}"
        assert got["tokens"].tolist() == ref_tokens, f"{path}, rank {rank}"


@pytest.mark.parametrize("path", ["shard_patched", "load_stock", "load_packed"])
def test_a_split_that_breaks_groups_fails_on_every_rank(path, tmp_path):
    # H=192 over 2 ranks is 96 columns: not a whole number of 64-wide groups.
    model, config = build_model(dict(SMALL, intermediate_size=192), seed=12)
    stock = save_checkpoint(model, config, tmp_path / "stock")
    fm.convert(str(stock), str(tmp_path / "packed"))
    result = launch(str(tmp_path), path, str(stock), str(tmp_path / "packed"))
    # mlx.launch itself exits 0 whatever its ranks do: read each rank's report.
    assert not list(tmp_path.glob("*.npz")), "a rank went on past the bad split"
    for rank in (0, 1):
        report = tmp_path / f"error.rank{rank}.txt"
        assert report.exists(), f"rank {rank} reported no error\n{result.stderr}"
        message = report.read_text()
        assert message.startswith(f"rank {rank}: ValueError"), message
        assert "H=192 over N=2 ranks" in message and "group size 64" in message, message


@pytest.mark.parametrize("path", ["load_stock", "load_packed"])
def test_each_rank_holds_only_its_share_of_the_experts(path, tmp_path):
    # Experts are most of this model, so half of them shows in the total.
    model, config = build_model(dict(SMALL, num_local_experts=32, intermediate_size=256), seed=14)
    stock = save_checkpoint(model, config, tmp_path / "stock")
    fm.convert(str(stock), str(tmp_path / "packed"))
    args = [path, str(stock), str(tmp_path / "packed")]
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one"), *args],
                            capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    one = int(np.load(tmp_path / "one" / f"{path}.rank0.npz")["peak"])
    launch(str(tmp_path), *args)
    for rank in (0, 1):
        peak = int(np.load(tmp_path / f"{path}.rank{rank}.npz")["peak"])
        assert peak <= 0.7 * one, f"rank {rank} peaked at {peak} bytes, one process at {one}"


@pytest.mark.parametrize("which", [0, 1], ids=["stock", "packed"])
def test_generate_under_mlx_launch_prints_once(which, checkpoints):
    fused_moe_cli = Path(sys.executable).parent / "fused-moe"
    result = launch(
        "generate", "--model", str(checkpoints[which]), "--prompt", "Hello", "--max-tokens", "8",
        command=(str(fused_moe_cli),),
    )
    # Only rank 0 prints mlx-lm's summary; both ranks ran to the end.
    assert result.stdout.count("Generation: 8 tokens") == 1, result.stdout + result.stderr
    assert "exited with code" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_shard_refuses_a_model_that_is_not_minimax():
    with pytest.raises(TypeError, match="expected an mlx-lm MiniMax model"):
        fm.shard(tiny_llama())


def test_split_check_names_h_n_and_group_size():
    from fused_moe.models.tensor_parallel import check_split

    model, _ = build_model(dict(SMALL, intermediate_size=192), seed=13)
    fm.patch(model)
    with pytest.raises(ValueError, match=r"H=192 over N=2 ranks.*group size 64"):
        check_split(192, 2, model.layers[0].block_sparse_moe.experts.down_group_size, "here")
    check_split(192, 3, model.layers[0].block_sparse_moe.experts.down_group_size, "here")  # 64 each: fine
