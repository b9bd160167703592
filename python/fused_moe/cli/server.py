"""fused-moe server: mlx-lm's HTTP server on a patched mlx-lm MoE model.

Every option after --model is mlx_lm.server's own. The server loads its
model through fused_moe.load, so a stock checkpoint is patched on load and a
packed one is opened directly. Among them --kv-bits, --kv-group-size and
--quantized-kv-start quantize the KV cache (mlx-lm serves such requests one
at a time); at 4 and 8 bits the patched attention reads it on the fused
kernel.
"""

from __future__ import annotations

import argparse
import logging
import sys
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

from huggingface_hub.errors import CacheNotFound
from mlx_lm import server as mlx_server

from fused_moe.models.experts import FusedExperts
from fused_moe.models.load import load
from fused_moe.models.minimax_moe import MiniMaxMoE

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
    loaded = load(*args, **kwargs)
    fused = sum(isinstance(m, (MiniMaxMoE, FusedExperts)) for m in loaded[0].modules())
    logging.info("fused_moe: %d MoE blocks run on the fused kernels", fused)
    return loaded


def _scan_cache_dir(*args, **kwargs):
    """mlx_lm.server's scan of the Hugging Face cache for GET /v1/models,
    with no cache directory read as an empty cache: mlx-lm lets that error
    escape after sending 200, and the client gets an empty body."""
    try:
        return _stock_scan_cache_dir(*args, **kwargs)
    except CacheNotFound:
        return SimpleNamespace(repos=frozenset())


_stock_scan_cache_dir = mlx_server.scan_cache_dir


def _run_loaded(host, port, model_provider, *args, **kwargs):
    """mlx_lm.server's run, after loading the model it was given: a model
    that does not load stops the command before anything listens."""
    model_provider.load_default()
    return _stock_run(host, port, model_provider, *args, **kwargs)


_stock_run = mlx_server.run


def run(args: argparse.Namespace, extra: list[str]) -> int:
    # mlx_lm.server looks up its loaders as module globals when a model is
    # first requested; pointing them at ours is the whole integration.
    mlx_server.load = _load_fused
    # Its ThreadingHTTPServer listens with socketserver's backlog of 5: with
    # more clients connecting at once the kernel's accept queue overflows
    # and a client sees its connection reset (tests/test_server_load.py).
    # This process is the server, so the class attribute is ours to set.
    ThreadingHTTPServer.request_queue_size = LISTEN_BACKLOG
    mlx_server.sharded_load = _refuse_distributed
    mlx_server.scan_cache_dir = _scan_cache_dir
    mlx_server.run = _run_loaded
    sys.argv = ["fused-moe server", "--model", args.model, *extra]
    mlx_server.main()
    return 0
