"""One rank of the tensor-parallel tests (tests/test_sharding.py), run under
``mlx.launch -n 2 --backend ring``.

usage: sharding_worker.py OUT PATHS STOCK_DIR [PACKED_DIR]
For each of the comma-separated PATHS, writes OUT/<path>.rank<r>.npz with the float32 logits of tests' PROMPT, a
greedy continuation and the peak memory of loading, for one of the three paths to a sharded fused model:

  patch_after_shard  mlx-lm loads, model.shard(group), then fused_moe.patch
  shard_patched      fused_moe.load, then fused_moe.shard(model, group)
  load_stock         fused_moe.load(STOCK_DIR, tensor_group=group)
  load_packed        fused_moe.load(PACKED_DIR, tensor_group=group)

Errors are printed as "rank R: <message>", also written to
OUT/error.rank<r>.txt, and exit with status 1.
"""

import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import fused_moe as fm

# Run as a script: its package's parent (tests/) holds the shared helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.minimax_models import PROMPT  # noqa: E402

GENERATE = 16


def build(path_name: str, stock_dir: str, packed_dir: str, group):
    from mlx_lm import load as mlx_lm_load

    if path_name == "patch_after_shard":
        model, _ = mlx_lm_load(stock_dir, lazy=True)
        model.shard(group)
        fm.patch(model)
    elif path_name == "shard_patched":
        model, _ = fm.load(stock_dir)
        fm.shard(model, group)
    elif path_name == "load_stock":
        model, _ = fm.load(stock_dir, tensor_group=group)
    elif path_name == "load_packed":
        model, _ = fm.load(packed_dir, tensor_group=group)
    else:
        raise ValueError(f"unknown path {path_name!r}")
    model.set_dtype(mx.float32)
    return model


def main() -> int:
    from mlx_lm.generate import generate_step

    out, path_names, stock_dir = sys.argv[1:4]
    packed_dir = sys.argv[4] if len(sys.argv) > 4 else None
    group = mx.distributed.init()
    for path_name in path_names.split(","):
        try:
            mx.reset_peak_memory()
            model = build(path_name, stock_dir, packed_dir, group)
            peak = mx.get_peak_memory()
        except Exception as e:  # reported per rank, so the test sees every rank's error
            message = f"rank {group.rank()}: {type(e).__name__}: {e}"
            print(message, file=sys.stderr, flush=True)
            (Path(out) / f"error.rank{group.rank()}.txt").write_text(message)
            # mlx.launch stops the other ranks as soon as one exits: wait a
            # little for every rank to report its own error first.
            deadline = time.monotonic() + 60
            while len(list(Path(out).glob("error.rank*.txt"))) < group.size():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            return 1
        # Evaluated now: collectives must run in the same order on every rank.
        logits = model(mx.array([PROMPT]))
        mx.eval(logits)
        tokens = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=GENERATE)]
        # generate_step may leave a step in flight on its own stream; finish
        # it before the next path starts collectives of its own.
        mx.synchronize()
        np.savez(
            Path(out) / f"{path_name}.rank{group.rank()}.npz",
            logits=np.array(logits.astype(mx.float32)),
            tokens=np.array(tokens),
            ranks=group.size(),
            peak=peak,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
