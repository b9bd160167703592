"""Side by side with llama.cpp on the CPU, same machine, same run.

The synthetic full-width MiniMax of the ``--e2e`` benchmark (e2e.py: 4
layers, REAP widths, vocabulary 200,064, 3-bit experts with 4-bit edge
layers, 8-bit attention, embedding and lm_head) runs patched by fused_moe,
and the same model written as a GGUF (gguf_minimax.py: Q3_K experts with
Q4_K edge layers, Q8_0 attention, embedding and output) runs in llama.cpp's
``llama-bench``. The two sides alternate in rounds, a read probe between
each measurement, at each thread count:

- decode at each of --decode-contexts (1k and 32k): greedy steps after
  that many cached positions. Ours over a bf16 KV cache holding random keys
  and values (e2e.filled_cache); llama.cpp over its default f16 cache,
  filled by its own untimed prompt of that length (``llama-bench -d``).
  With --kv-bits, ours also over mlx-lm's quantized cache (no llama.cpp
  counterpart is run).
- prefill of each of --prefill (512 and 8k tokens), both as generation does
  it: the cache for the prompt, then only the last token's logits. Ours:
  mlx-lm's way (e2e.prefill_s: the cache for all but the last token in
  steps of 2048, then the last token through the whole model);
  llama-bench's prompt test (``-p N -n 0``) computes the logits of the last
  position only.

Every line gives the round's tokens per second of each side, their ratio
(fused / llama.cpp) and the probe; the summary gives the medians, and for
ours the share of the decode floor (bytes one token must read, weights plus
cache, over the median probe).

llama-bench is found (--llama-bench, $LLAMA_BENCH, or the cache directory)
or built once into the cache directory (~/.cache/fused_moe/llamacpp) from
the llama_cpp_python source package, which bundles llama.cpp (about 7
minutes or more on 2 cores); the GGUF is written there once as well.

    python benchmarks/vs_llamacpp.py --threads 1 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlx.core as mx  # noqa: E402

import e2e  # noqa: E402
import fused_moe as fm  # noqa: E402
import gguf_minimax  # noqa: E402
from moe_tok_s import MINIMAX_M25_REAP, Shapes, random_projection  # noqa: E402
from probes import Probes  # noqa: E402

CACHE_DIR = Path(os.environ.get("FUSED_MOE_LLAMACPP_DIR", Path.home() / ".cache" / "fused_moe" / "llamacpp"))
# llama_cpp_python 0.3.36 bundles llama.cpp 0c1e57098 (ggml 0.25.3).
LLAMA_CPP_PYTHON = "0.3.36"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_BLAS=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
]


# ---------------------------------------------------------------------------
# llama.cpp: llama-bench and the GGUF
# ---------------------------------------------------------------------------


def llama_source() -> Path:
    return CACHE_DIR / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def find_or_build_llama_bench(path: str | None) -> Path:
    for candidate in (path, os.environ.get("LLAMA_BENCH"), llama_source() / "build" / "bin" / "llama-bench"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    src = llama_source()
    if not src.is_dir():
        dl = CACHE_DIR / "dl"
        print(f"llama.cpp: fetching the llama_cpp_python {LLAMA_CPP_PYTHON} source package into {dl}", flush=True)
        # --no-build-isolation: pip reads the package's metadata with this
        # environment's scikit-build-core, instead of first building its
        # build requirements (cmake among them) from source.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", f"llama_cpp_python=={LLAMA_CPP_PYTHON}", "-d", str(dl)], check=True)
        with tarfile.open(dl / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            tar.extractall(CACHE_DIR)
    print(f"llama.cpp: building llama-bench in {src / 'build'} (about 7 minutes or more on 2 cores)", flush=True)
    start = time.monotonic()
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_FLAGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), f"-j{os.cpu_count() or 1}", "--target", "llama-bench"],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"llama.cpp: built in {time.monotonic() - start:.0f} s", flush=True)
    return src / "build" / "bin" / "llama-bench"


def find_or_write_gguf(path: str | None, layers: int) -> Path:
    out = Path(path) if path else CACHE_DIR / f"minimax_synthetic_{layers}l.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"llama.cpp: writing the {layers}-layer GGUF to {out}", flush=True)
        tmp = out.with_suffix(".partial")
        gguf_minimax.write(str(tmp), layers, log=lambda line: None)
        tmp.rename(out)
    return out


# What llama-bench reports of its own settings (its first run's JSON).
LLAMA_SETTINGS: dict = {}


def llama_bench(binary: Path, gguf: Path, threads: int, *, prompt: int = 0, gen: int = 0, depth: int = 0) -> float:
    """One llama-bench measurement (one repetition, after its own warm-up):
    tokens per second."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
           "-p", str(prompt), "-n", str(gen), "-d", str(depth)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout)[0]
    if not LLAMA_SETTINGS:
        LLAMA_SETTINGS.update({k: row.get(k) for k in ("build_commit", "cpu_info", "type_k", "type_v", "flash_attn",
                                                        "n_batch", "n_ubatch", "n_threads")})
        print(f"  llama-bench settings: {LLAMA_SETTINGS}", flush=True)
    return float(row["avg_ts"])


# ---------------------------------------------------------------------------
# fused_moe: the patched e2e model
# ---------------------------------------------------------------------------


def build_ours(layers: int, dtype=mx.bfloat16):
    D, H, E, k = MINIMAX_M25_REAP
    shapes = Shapes(D, H, E, k, 3, 64, dtype)
    model = e2e.build_model(shapes, layers, random_projection)
    fm.patch(model)
    return model


def ours_prefill_tps(model, tokens: int) -> float:
    prompt = mx.random.randint(0, e2e.VOCAB, (tokens,), key=mx.random.key(tokens))
    return tokens / e2e.prefill_s(model, prompt)


def ours_decode_tps(model, cache, steps: int) -> float:
    """Greedy steps over `cache` (it grows by `steps` positions), each
    token fed to the next step and evaluated on its own, as generation."""
    token = mx.array([[1]])
    mx.eval(model(token, cache=cache))  # warm-up step
    start = time.perf_counter()
    for _ in range(steps):
        token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1, keepdims=True)
        mx.eval(token)
    return steps / (time.perf_counter() - start)


# ---------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 32768])
    ap.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per round (default 16)")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 8192])
    ap.add_argument("--kv-bits", type=int, nargs="*", default=[8],
                    help="ours also decodes over mlx-lm's quantized cache of these bits (default 8)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--llama-bench", help="path to llama-bench (default: find or build it)")
    ap.add_argument("--gguf", help="the model as a GGUF (default: write it into the cache directory)")
    ap.add_argument("--json", help="write every round and the medians here")
    args = ap.parse_args()

    binary = find_or_build_llama_bench(args.llama_bench)
    gguf = find_or_write_gguf(args.gguf, args.layers)
    mx.set_default_device(mx.cpu)
    probes = Probes()
    print(f"fused_moe {fm.__version__} (CPU kernels {fm.cpu_isa()}) against {binary}; {os.cpu_count()} "
          f"hardware threads; {args.layers}-layer synthetic MiniMax (bf16 activations; GGUF {gguf.name})", flush=True)
    print("decode: greedy steps after N cached positions (ours: bf16 cache of random keys/values; llama.cpp: "
          "its f16 cache after an untimed prompt of N). prefill: as generation does it, the cache for the "
          "prompt then the last token's logits only.", flush=True)
    model = build_ours(args.layers)
    mx.eval(model(mx.array([[1, 2, 3, 4]])))  # warm-up: one-time costs of every op

    results = []  # dicts: test, threads, round, fused, llama, probe

    def record(test, threads, rnd, fused, llama, context=None, kv_bits=None):
        probe = probes.read_gb_s[-1]
        ratio = fused / llama if llama else float("nan")
        results.append(dict(test=test, threads=threads, round=rnd, fused=fused, llama=llama, ratio=ratio,
                            probe=probe, context=context, kv_bits=kv_bits))
        lt = f"{llama:>10.2f}" if llama else f"{'-':>10}"
        rt = f"{ratio:>7.2f}x" if llama else f"{'-':>8}"
        print(f"  {test:<22} {threads:>2} thr  round {rnd}:  fused {fused:>8.2f}  llama.cpp {lt}  {rt}  "
              f"probe {probe:5.1f} GB/s", flush=True)

    before = fm.get_num_threads()
    try:
        for ctx in args.decode_contexts:
            forms = [None] + list(args.kv_bits)
            for threads in args.threads:
                fm.set_num_threads(threads)
                for rnd in range(args.rounds):
                    for kv_bits in forms:
                        cache = e2e.filled_cache(model, ctx, mx.bfloat16, kv_bits=kv_bits)
                        probes.sample()
                        fused = ours_decode_tps(model, cache, args.decode_tokens)
                        del cache
                        probes.sample()
                        llama = (llama_bench(binary, gguf, threads, gen=args.decode_tokens, depth=ctx)
                                 if kv_bits is None else 0.0)
                        name = f"decode {ctx}" + ("" if kv_bits is None else f", {kv_bits}-bit cache")
                        record(name, threads, rnd, fused, llama, ctx, kv_bits)
        for n in args.prefill:
            for threads in args.threads:
                fm.set_num_threads(threads)
                for rnd in range(args.rounds):
                    probes.sample()
                    fused = ours_prefill_tps(model, n)
                    probes.sample()
                    llama = llama_bench(binary, gguf, threads, prompt=n)
                    record(f"prefill {n}", threads, rnd, fused, llama)
    finally:
        fm.set_num_threads(before)

    print(f"\nmedians over {args.rounds} rounds (tokens/s; ratio = median of the per-round ratios; read probe "
          f"median {probes.gb_s:.1f} GB/s):")
    print(f"  {'test':<22} {'threads':>7} {'fused':>9} {'llama.cpp':>10} {'ratio':>7} {'% of floor':>11}")
    summary = []
    for test in dict.fromkeys(r["test"] for r in results):
        for threads in args.threads:
            rows = [r for r in results if r["test"] == test and r["threads"] == threads]
            if not rows:
                continue
            fused = statistics.median(r["fused"] for r in rows)
            llama = statistics.median(r["llama"] for r in rows)
            ratio = statistics.median(r["ratio"] for r in rows) if llama else float("nan")
            floor = ""
            if rows[0]["context"] is not None:
                fb = sum(e2e.decode_floor_bytes(model, rows[0]["context"], mx.bfloat16, rows[0]["kv_bits"]).values())
                floor = f"{100 * fused * fb / (probes.gb_s * 1e9):>10.0f}%"
            summary.append(dict(test=test, threads=threads, fused=fused, llama=llama, ratio=ratio))
            lt = f"{llama:>10.2f}" if llama else f"{'-':>10}"
            rt = f"{ratio:>6.2f}x" if llama else f"{'-':>7}"
            print(f"  {test:<22} {threads:>7} {fused:>9.2f} {lt} {rt} {floor:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rounds=results, medians=summary, probe_gb_s=probes.gb_s, llama_bench=str(binary),
                           llama_settings=LLAMA_SETTINGS), f, indent=1)


if __name__ == "__main__":
    main()
