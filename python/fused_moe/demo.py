"""`fused-moe demo`: the whole flow on a tiny synthetic model, in about a
minute, with no model to download.

1. Write a tiny Hugging Face MiniMax-M2 checkpoint (random bf16 weights, a
   small byte-level tokenizer): the form a real model comes in.
2. Convert it to the packed format under the seed recipe, as
   ``fused-moe convert SRC DST --recipe seed-3.7bit`` does.
3. Load it (``fused_moe.load``) and generate a few tokens (greedy; random
   weights make gibberish, the point is the flow).
4. Serve it with ``fused-moe server`` and send one completion request.

Every step prints the command a user would run for a real model.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import numpy as np

from fused_moe.conversion.pipeline import convert
from fused_moe.models.load import load

# A MiniMax-M2 at toy size: its config as Hugging Face writes it.
CONFIG = {
    "architectures": ["MiniMaxM2ForCausalLM"],
    "model_type": "minimax_m2",
    "hidden_size": 256,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rotary_dim": 32,
    "num_hidden_layers": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "shared_intermediate_size": 0,
    "vocab_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5000000.0,
    "use_qk_norm": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}
TEXT = [
    "Mixture-of-experts models send every token to a few experts out of many. " * 3,
    "The fused kernels read each selected expert's weights once per step. " * 3,
    "A quick brown fox jumps over the lazy dog, and the dog does not mind. " * 3,
]
PROMPT = "Mixture-of-experts models"


def _tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    while tok.get_vocab_size() < vocab_size:
        tok.add_tokens([f"<extra_{tok.get_vocab_size()}>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def write_source(path: Path, seed: int = 0) -> Path:
    """The tiny Hugging Face checkpoint: per-expert w1/w2/w3 weights, a float32
    router and routing bias, everything else bf16."""
    c = CONFIG
    rng = np.random.default_rng(seed)
    D, H, E, V = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]

    def matrix(rows, cols, dtype=mx.bfloat16):
        return mx.array(rng.normal(0, cols**-0.5, size=(rows, cols)).astype(np.float32)).astype(dtype)

    def norm(n):
        return mx.array((1 + 0.05 * rng.normal(size=n)).astype(np.float32)).astype(mx.bfloat16)

    tensors = {"model.embed_tokens.weight": matrix(V, D), "model.norm.weight": norm(D), "lm_head.weight": matrix(V, D)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        tensors.update({
            f"{p}.input_layernorm.weight": norm(D),
            f"{p}.post_attention_layernorm.weight": norm(D),
            f"{p}.self_attn.q_proj.weight": matrix(q, D),
            f"{p}.self_attn.k_proj.weight": matrix(kv, D),
            f"{p}.self_attn.v_proj.weight": matrix(kv, D),
            f"{p}.self_attn.o_proj.weight": matrix(D, q),
            f"{p}.self_attn.q_norm.weight": norm(q),
            f"{p}.self_attn.k_norm.weight": norm(kv),
            f"{p}.block_sparse_moe.gate.weight": matrix(E, D, mx.float32),
            f"{p}.block_sparse_moe.e_score_correction_bias": mx.array(
                (0.05 * rng.normal(size=E)).astype(np.float32)),
        })
        for e in range(E):
            for name, (rows, cols) in (("w1", (H, D)), ("w3", (H, D)), ("w2", (D, H))):
                tensors[f"{p}.block_sparse_moe.experts.{e}.{name}.weight"] = matrix(rows, cols)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), tensors, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    _tokenizer(V).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_once(model: Path, say) -> str:
    port = _free_port()
    command = [sys.executable, "-m", "fused_moe", "server", "--model", str(model), "--port", str(port)]
    say(f"$ fused-moe server --model {model} --port {port}")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"fused-moe server exited: {server.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    body = json.loads(response.read())
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return body["choices"][0]["text"]


def run(directory: Path, serve: bool = True, say=print) -> dict:
    """The four steps in `directory`; returns what each produced."""
    from mlx_lm import generate

    directory = Path(directory)
    start = time.perf_counter()
    source, packed = directory / "minimax-tiny-hf", directory / "minimax-tiny-packed"
    say(f"1. a tiny Hugging Face MiniMax-M2 checkpoint (random weights) in {source}")
    write_source(source)
    say(f"2. $ fused-moe convert {source} {packed} --recipe seed-3.7bit --overwrite")
    summary = convert(source, packed, recipe="seed-3.7bit", overwrite=True)
    say(f"3. fused_moe.load({str(packed)!r}) and generate (greedy; random weights make gibberish)")
    model, tokenizer = load(str(packed))
    text = generate(model, tokenizer, PROMPT, max_tokens=12, verbose=False)
    say(f"   {PROMPT!r} -> {text!r}")
    out = {"source": str(source), "packed": str(packed), "bits_per_weight": summary.bits_per_weight,
           "generated": text}
    if serve:
        say("4. serve it and send one completion request")
        out["served"] = _serve_once(packed, lambda line: say(f"   {line}"))
        say(f"   the server answered {out['served']!r}")
    out["seconds"] = time.perf_counter() - start
    say(f"done in {out['seconds']:.0f} s. For a real model: fused-moe convert SRC DST --recipe seed-3.7bit, "
        f"then fused-moe generate --model DST --prompt ...")
    return out
