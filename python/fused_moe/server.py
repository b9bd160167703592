"""``fused-moe server``: mlx-lm's HTTP server on a patched MiniMax model.

Every option after ``--model`` is mlx_lm.server's own. The server loads its
model through :func:`fused_moe.load`, so a stock checkpoint is patched on
load and a packed one is opened directly. Among them ``--kv-bits``,
``--kv-group-size`` and ``--quantized-kv-start`` quantize the KV cache
(mlx-lm serves such requests one at a time); at 4 and 8 bits the patched
attention reads it on the fused kernel.
"""

from __future__ import annotations

import argparse


# Connections the listening socket queues before accepting them.
LISTEN_BACKLOG = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (stock mlx-lm or packed)")
    parser.epilog = "Other options are passed to mlx_lm.server (see mlx_lm.server --help)."


def _refuse_distributed(*args, **kwargs):
    raise NotImplementedError(
        "fused-moe server: distributed serving (mlx.launch) is not supported yet"
    )


def _load_fused(*args, **kwargs):
    import logging

    from fused_moe.layer import MiniMaxMoE
    from fused_moe.loading import load

    loaded = load(*args, **kwargs)
    fused = sum(isinstance(m, MiniMaxMoE) for m in loaded[0].modules())
    logging.info("fused_moe: %d MoE blocks run on the fused kernels", fused)
    return loaded


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import sys

    from mlx_lm import server

    # mlx_lm.server looks up its loaders as module globals when a model is
    # first requested; pointing them at ours is the whole integration.
    server.load = _load_fused
    # Its ThreadingHTTPServer listens with socketserver's backlog of 5: with
    # more clients connecting at once the kernel's accept queue overflows
    # and a client sees its connection reset (tests/test_server_load.py).
    # This process is the server, so the class attribute is ours to set.
    from http.server import ThreadingHTTPServer

    ThreadingHTTPServer.request_queue_size = LISTEN_BACKLOG
    server.sharded_load = _refuse_distributed
    sys.argv = ["fused-moe server", "--model", args.model, *extra]
    server.main()
    return 0
