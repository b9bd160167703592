"""`fused-moe server` under load, on loopback only.

A tiny packed MiniMax checkpoint is served; 16 client threads (stdlib
http.client) send, for a bounded time, a mix of non-streaming and streaming
greedy completions of mixed prompt lengths, streams they drop mid-way,
malformed JSON, an invalid field, and a prompt longer than the model's
context. Checked: the server never dies; every well-formed greedy request
returns the text the same request got when sent alone; malformed ones get a
4xx; the server's RSS after the load is within a bound of before. Printed:
requests per second, p50/p99 latency, the error rate.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fused_moe as fm
from support.minimax_models import SMALL, make_checkpoint

HOST = "127.0.0.1"
CLIENTS = 16
LOAD_SECONDS = float(os.environ.get("FUSED_MOE_LOAD_SECONDS", "60"))
MAX_REQUESTS_PER_CLIENT = 400
# The words the test tokenizer was trained on (minimax_models.build_tokenizer).
WORDS = "the quick brown fox jumps over lazy dog mixture of experts models route every token to a few".split()
MEMORY_BOUND_MB = 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# A short context, so that a prompt longer than it stays cheap to prefill.
CONTEXT = 64
SERVED = dict(SMALL, max_position_embeddings=CONTEXT)


def _prompts() -> list[str]:
    rng = random.Random(0)
    lengths = [1, 2, 5, 12, 24, 48]
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


class Server:
    def __init__(self, model: Path, log: Path):
        self.port = _free_port()
        # A file, not a pipe: a pipe nobody drains fills up and stalls the server.
        self.log = log
        self._log_file = open(log, "w")
        # `fused-moe server`, with a stack dump of every thread on SIGUSR1
        # (for a request that never comes back).
        launcher = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
                    "from fused_moe.cli import main; sys.exit(main(sys.argv[1:]))")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", launcher, "server", "--model", str(model), "--host", HOST,
             "--port", str(self.port), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=self._log_file,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                status, _ = self.request("GET", "/health", None, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not come up within 120 s")

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def request(self, method, path, body, timeout: float = float(os.environ.get("FUSED_MOE_REQUEST_TIMEOUT", "120"))):
        conn = self.connection(timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def dump_threads(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)
        time.sleep(2)

    def stop(self) -> str:
        """Stops the server; returns its log."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()
        return self.log.read_text()


def completion_body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}


def complete(server: Server, prompt: str, max_tokens: int) -> str:
    status, raw = server.request("POST", "/v1/completions", completion_body(prompt, max_tokens, False))
    assert status == 200, (status, raw[:500])
    return json.loads(raw)["choices"][0]["text"]


def stream(server: Server, prompt: str, max_tokens: int, drop_after: int | None = None) -> str | None:
    """The streamed text, or None when the client hung up on purpose."""
    conn = server.connection(120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(completion_body(prompt, max_tokens, True)).encode(),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, (r.status, r.read()[:500])
        text, events = [], 0
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            events += 1
            if drop_after is not None and events >= drop_after:
                return None  # hang up mid-stream
            chunk = json.loads(payload)
            if chunk.get("choices"):
                text.append(chunk["choices"][0].get("text", ""))
        return "".join(text)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def packed_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    stock = make_checkpoint(root / "stock", SERVED)
    fm.convert(stock, root / "packed")
    return root / "packed"


@pytest.mark.slow
def test_server_under_load(packed_model, tmp_path):
    server = Server(packed_model, tmp_path / "server.log")
    try:
        prompts = _prompts()
        requests = [(p, n) for p in prompts for n in (1, 8)]
        alone = {(p, n): complete(server, p, n) for p, n in requests}
        # Streaming alone gives the same text.
        for p, n in requests[:4]:
            assert stream(server, p, n) == alone[(p, n)]
        too_long = " ".join(random.Random(1).choice(WORDS) for _ in range(2 * CONTEXT))
        rss_before = _rss_mb(server.proc.pid)

        lock = threading.Lock()
        latencies, mismatches, errors, statuses = [], [], [], {}
        stop_at = time.monotonic() + LOAD_SECONDS

        def client(n: int) -> None:
            rng = random.Random(100 + n)
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                if time.monotonic() > stop_at:
                    return
                kind = rng.choices(["plain", "stream", "drop", "malformed", "invalid", "too_long"],
                                   [40, 30, 10, 8, 7, 5])[0]
                p, m = rng.choice(requests)
                started = time.monotonic()
                try:
                    if kind == "plain":
                        got = complete(server, p, m)
                    elif kind == "stream":
                        got = stream(server, p, m)
                    elif kind == "drop":
                        stream(server, p, 8, drop_after=1)
                        got = None
                    elif kind == "malformed":
                        status, _ = server.request("POST", "/v1/completions", b'{"prompt": "the", "max_tokens": ')
                        got = None
                        with lock:
                            statuses.setdefault(kind, []).append(status)
                    elif kind == "invalid":
                        status, _ = server.request("POST", "/v1/completions", {"prompt": p, "max_tokens": -3})
                        got = None
                        with lock:
                            statuses.setdefault(kind, []).append(status)
                    else:
                        status, _ = server.request("POST", "/v1/completions", completion_body(too_long, 1, False))
                        got = None
                        with lock:
                            statuses.setdefault(kind, []).append(status)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{kind}: {type(e).__name__}: {e}")
                    continue
                elapsed = time.monotonic() - started
                with lock:
                    if kind in ("plain", "stream"):
                        latencies.append(elapsed)
                        if got != alone[(p, m)]:
                            mismatches.append((kind, p[:40], m, got, alone[(p, m)]))

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=LOAD_SECONDS + 300)
        wall = time.monotonic() - started
        assert not any(t.is_alive() for t in threads), "a client is stuck"
        assert server.proc.poll() is None, "the server died under load"
        # Still answering, and the same as before.
        p, n = requests[-1]
        try:
            after = complete(server, p, n)
        except TimeoutError:
            server.dump_threads()
            raise AssertionError(f"no answer after the load: {server.stop()[-20000:]}") from None
        assert after == alone[(p, n)]
        rss_after = _rss_mb(server.proc.pid)

        served = len(latencies)
        total = served + sum(len(v) for v in statuses.values()) + len(errors)
        lat = sorted(latencies)
        p50 = lat[len(lat) // 2] if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
        print(
            f"\nserver: {CLIENTS} clients for {wall:.0f} s: {total} requests, {served} well-formed completions "
            f"({served / wall:.1f}/s), p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
            f"errors {len(errors)} ({len(errors) / max(total, 1):.1%}); mismatches {len(mismatches)}; "
            f"statuses {{{', '.join(f'{k}: {sorted(set(v))}' for k, v in statuses.items())}}}; "
            f"RSS {rss_before:.0f} -> {rss_after:.0f} MB"
        )
        assert not errors, errors[:5]
        assert not mismatches, mismatches[:3]
        assert served >= CLIENTS
        assert all(400 <= s < 500 for s in statuses.get("malformed", [])), statuses["malformed"]
        assert all(400 <= s < 500 for s in statuses.get("invalid", [])), statuses["invalid"]
        # Longer than the context: answered (mlx-lm does not cut prompts), never a 5xx.
        assert all(s < 500 for s in statuses.get("too_long", [])), statuses["too_long"]
        assert rss_after - rss_before < MEMORY_BOUND_MB, (rss_before, rss_after)
    finally:
        err = server.stop()
    # mlx-lm's handler prints a traceback for each client that hung up
    # mid-stream (a write to a closed socket); nothing else may raise. (Log
    # lines of other threads interleave with tracebacks: match the lines that
    # name an exception.)
    raised = re.findall(r"^([A-Za-z_.]*(?:Error|Exception|Exit|Interrupt))(?::|$)", err, re.M)
    unexpected = [r for r in raised if r not in ("BrokenPipeError", "ConnectionResetError")]
    assert not unexpected, sorted(set(unexpected))
