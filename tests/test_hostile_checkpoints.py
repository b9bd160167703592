"""Hostile and broken checkpoints.

`fused-moe convert` and `fused_moe.load` meet each with a one-line error that
names the file (and the tensor, where the file still names one): never a
crash, a hang, or an allocation sized by an untrusted number before it is
checked. Every case edits a copy of a small valid checkpoint, stock (mlx-lm)
or packed, so the edit is the only thing wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fused_moe as fm
from fused_moe.checkpoint.minimax import block_path
from fused_moe.packed import spec
from fused_moe.cli import main as cli_main
from support.minimax_models import SMALL, make_checkpoint

INDEX = "model.safetensors.index.json"
# A float32 tensor both kinds of checkpoint hold, that does not start the data.
TARGET = "model.layers.1.block_sparse_moe.e_score_correction_bias"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    stock = make_checkpoint(root / "stock", SMALL)
    fm.convert(stock, root / "packed")
    return {"stock": stock, "packed": root / "packed"}


# ---------------------------------------------------------------- file surgery


def shard_of(src: Path, tensor: str = TARGET) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"][tensor]


def read_raw(shard: Path) -> tuple[dict, bytes]:
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(shard: Path, header: bytes | dict, data: bytes, header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def edit_header(src: Path, change) -> Path:
    """Applies `change(header)` to the header of TARGET's shard; keeps the data."""
    shard = shard_of(src)
    header, data = read_raw(shard)
    change(header)
    write_raw(shard, header, data)
    return shard


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _set(entry_key, value):
    return lambda h: h[TARGET].__setitem__(entry_key, value)


# ---------------------------------------------------------------- the cases
# Each takes a checkpoint copy, breaks it, and returns the regex the one-line
# error must match (it includes the file, and the tensor where there is one).


def header_length_past_the_end(src):
    shard = shard_of(src)
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    return rf"{shard.name}: corrupt or truncated safetensors file \(header length {len(data)}"


def header_length_2_gib(src):
    shard = shard_of(src)
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 2**31) + data[8:])
    return rf"{shard.name}: corrupt or truncated safetensors file \(header length {2**31}"


def header_not_json(src):
    shard = shard_of(src)
    header, data = read_raw(shard)
    raw = json.dumps(header).encode()
    write_raw(shard, b"{" + b"#" * (len(raw) - 1), data)
    return rf"{shard.name}: corrupt safetensors header: not valid JSON"


def header_not_utf8(src):
    shard = shard_of(src)
    header, data = read_raw(shard)
    raw = json.dumps(header).encode().replace(TARGET.encode(), TARGET.encode()[:-4] + b"\xff\xfe\xfd\xfc")
    write_raw(shard, raw, data)
    return rf"{shard.name}: corrupt safetensors header: not UTF-8"


def header_nested_too_deeply(src):
    shard = shard_of(src)
    _, data = read_raw(shard)
    write_raw(shard, b"[" * 200_000 + b"]" * 200_000, data)
    return rf"{shard.name}: corrupt safetensors header: not valid JSON \(nested too deeply\)"


def tensor_named_twice(src):
    shard = shard_of(src)
    header, data = read_raw(shard)
    raw = json.dumps(header).encode()
    entry = json.dumps(header[TARGET]).encode()
    raw = raw[:-1] + b", " + json.dumps(TARGET).encode() + b": " + entry + b"}"
    write_raw(shard, raw, data)
    return rf"{shard.name}: corrupt safetensors header: not valid JSON \(key '{TARGET}' appears twice\)"


def offsets_overlap(src):
    def change(h):
        begin, end = h[TARGET]["data_offsets"]
        h[TARGET]["data_offsets"] = [begin - 4, end - 4]
    shard = edit_header(src, change)
    return rf"{shard.name}: corrupt header: tensor {TARGET} starts at byte \d+ .*overlap"


def offsets_run_backwards(src):
    shard = edit_header(src, lambda h: h[TARGET]["data_offsets"].reverse())
    return rf"{shard.name}: corrupt header: tensor {TARGET} F32 \[8\] needs 32 bytes but spans \[\d+, \d+\)"


def offsets_past_the_end(src):
    shard = shard_of(src)
    header, data = read_raw(shard)
    last = by_offset(header)[-1]
    entry = header[last]
    begin, end = entry["data_offsets"]
    entry["shape"] = [entry["shape"][0] * 2, *entry["shape"][1:]]
    entry["data_offsets"] = [begin, begin + 2 * (end - begin)]
    write_raw(shard, header, data)
    return rf"{shard.name}: truncated safetensors file: tensor {re.escape(last)} ends at byte \d+, the file has"


def bytes_disagree_with_shape(src):
    shard = edit_header(src, _set("shape", [9]))
    return rf"{shard.name}: corrupt header: tensor {TARGET} F32 \[9\] needs 36 bytes but spans"


def dtype_disagrees_with_bytes(src):
    shard = edit_header(src, _set("dtype", "F16"))
    return rf"{shard.name}: corrupt header: tensor {TARGET} F16 \[8\] needs 16 bytes but spans"


def unknown_dtype(src):
    shard = edit_header(src, _set("dtype", "F7"))
    return rf"{shard.name}: tensor {TARGET} has unsupported dtype 'F7'"


def negative_shape(src):
    shard = edit_header(src, _set("shape", [-2, -4]))
    return rf"{shard.name}: tensor {TARGET} has a bad shape \[-2, -4\]"


def shape_that_overflows_int64(src):
    # 2**32 * 2**32 * 4 bytes wraps to 0 in int64: a zero-byte tensor at the end.
    def change(h):
        end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        h["evil"] = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [end, end]}
    shard = edit_header(src, change)
    return rf"{shard.name}: corrupt header: tensor evil F32 \[4294967296, 4294967296\] needs 73786976294838206464 bytes"


def float_offsets(src):
    shard = edit_header(src, lambda h: h[TARGET].__setitem__("data_offsets", [float(o) for o in h[TARGET]["data_offsets"]]))
    return rf"{shard.name}: tensor {TARGET} has bad data_offsets \[\d+\.0, \d+\.0\]"


def entry_not_an_object(src):
    shard = edit_header(src, lambda h: h.__setitem__(TARGET, "x"))
    return rf"{shard.name}: corrupt header entry for tensor {TARGET}: 'x'"


def metadata_not_strings(src):
    shard = edit_header(src, lambda h: h.__setitem__("__metadata__", {"format": 1}))
    return rf"{shard.name}: corrupt safetensors header \(__metadata__ must map names to strings\)"


def name_with_a_newline(src):
    # The message stays one line: the name is shown escaped.
    shard = edit_header(src, lambda h: h.__setitem__("a\nb", {"dtype": "F7", "shape": [], "data_offsets": [0, 0]}))
    return rf"{shard.name}: tensor 'a\\nb' has unsupported dtype 'F7'"


def shard_missing(src):
    shard = shard_of(src)
    shard.unlink()
    return rf"{INDEX}: lists file {shard.name}, which does not exist"


def shard_is_a_fifo(src):
    # Opening a FIFO waits for a writer: the check must not open it.
    shard = shard_of(src)
    shard.unlink()
    os.mkfifo(shard)
    return rf"{shard.name}: not a regular file"


def tensor_in_two_shards(src):
    from support.hf_checkpoints import Tensor, write_safetensors

    shard = shard_of(src)
    header, data = read_raw(shard)
    begin, end = header[TARGET]["data_offsets"]
    extra = src / "model-0.safetensors"  # read before the shard; mlx-lm globs model*
    write_safetensors(extra, {TARGET: Tensor("F32", [8], data[begin:end])})
    edit_json(src / INDEX, lambda i: i["weight_map"].__setitem__(TARGET, extra.name))
    return rf"{shard.name}: tensor {TARGET} is also in {extra.name}"


def index_names_a_path(src):
    shard = shard_of(src)
    shutil.copy(shard, src.parent / "elsewhere.safetensors")
    edit_json(src / INDEX, lambda i: i["weight_map"].__setitem__(TARGET, "../elsewhere.safetensors"))
    return rf"{INDEX}: tensor {TARGET} is placed in '../elsewhere.safetensors', which is not a file name"


def index_not_json(src):
    (src / INDEX).write_bytes(b"\xff\xfe{")
    return rf"{INDEX}: not UTF-8"


def unlisted_shard_mlx_lm_would_load(src):
    # Not in the index, but mlx-lm's loader globs model*.safetensors; the
    # converter ignores it, load must check it.
    write_raw(src / "model-stray.safetensors", b"{}", b"", header_len=2**31)
    return r"model-stray.safetensors: corrupt or truncated safetensors file \(header length 2147483648"


def config_shapes_disagree(src):
    edit_json(src / "config.json", lambda c: c.__setitem__("num_local_experts", 7))
    return r"tensor model.layers.0.block_sparse_moe.gate.weight has shape \[8, 128\], expected \[7, 128\]"


def config_not_an_object(src):
    (src / "config.json").write_text("[1, 2]")
    return r"config.json: not a JSON object"


def config_head_dim_not_a_number(src):
    edit_json(src / "config.json", lambda c: c.__setitem__("head_dim", "32"))
    return r"config.json: head_dim must be a positive integer, got '32'"


def quantization_bits_zero(src):
    path = "model.layers.1.block_sparse_moe.switch_mlp.down_proj"
    edit_json(src / "config.json", lambda c: c["quantization"].__setitem__(path, {"bits": 0, "group_size": 64}))
    return rf"config.json: quantization\['{path}'\] needs bits in \(2, 3, 4, 5, 6, 8\)"


def quantization_group_size_zero(src):
    path = "model.layers.1.block_sparse_moe.switch_mlp.down_proj"
    edit_json(src / "config.json", lambda c: c["quantization"].__setitem__(path, {"bits": 3, "group_size": 0}))
    return rf"config.json: quantization\['{path}'\] needs bits in \(2, 3, 4, 5, 6, 8\) and group_size in \(32, 64, 128\)"


def _fused(change):
    return lambda src: edit_json(src / "config.json", lambda c: change(c[spec.CONFIG_KEY]))


BLOCK1 = block_path(1)
EXPERTS1 = f"{BLOCK1}.{spec.MODULE_NAME}"


def format_version_a_string(src):
    _fused(lambda f: f.__setitem__(spec.CONFIG_FORMAT_VERSION, "1"))(src)
    return r"format.version (is )?'1'"


def format_version_true(src):
    _fused(lambda f: f.__setitem__(spec.CONFIG_FORMAT_VERSION, True))(src)
    return r"format.version (is )?True"


def layers_claims_one_too_many(src):
    extra = f"{block_path(3)}.{spec.MODULE_NAME}"
    _fused(lambda f: f[spec.CONFIG_EXPERTS].__setitem__(extra, f[spec.CONFIG_EXPERTS][EXPERTS1]))(src)
    return r"config.json: fused_moe must describe exactly the 3 MoE blocks of num_hidden_layers=3"


def layers_claims_one_too_few(src):
    _fused(lambda f: f[spec.CONFIG_EXPERTS].pop(f"{block_path(2)}.{spec.MODULE_NAME}"))(src)
    return r"config.json: fused_moe must describe exactly the 3 MoE blocks"


def layers_not_an_object(src):
    _fused(lambda f: f.__setitem__(spec.CONFIG_EXPERTS, [1]))(src)
    return r"config.json: fused_moe.experts must be an object, got \[1\]"


def bits_the_tensors_contradict(src):
    # Layer 1 is 3-bit; the section claims 4.
    _fused(lambda f: f[spec.CONFIG_EXPERTS][EXPERTS1]["gate_up"].__setitem__("bits", 4))(src)
    return rf"tensor {EXPERTS1}.gate_up.weight has shape \[8, 256, 12\], expected \[8, 256, 16\]"


def bits_not_a_number(src):
    _fused(lambda f: f[spec.CONFIG_EXPERTS][EXPERTS1]["down"].__setitem__("bits", "3"))(src)
    return rf"config.json: fused_moe.experts\['{EXPERTS1}'\].down needs a mode \(string\), bits and group_size"


EITHER = ("stock", "packed")
CASES = {
    header_length_past_the_end: EITHER,
    header_length_2_gib: EITHER,
    header_not_json: EITHER,
    header_not_utf8: EITHER,
    header_nested_too_deeply: EITHER,
    tensor_named_twice: EITHER,
    offsets_overlap: EITHER,
    offsets_run_backwards: EITHER,
    offsets_past_the_end: EITHER,
    bytes_disagree_with_shape: EITHER,
    dtype_disagrees_with_bytes: EITHER,
    unknown_dtype: EITHER,
    negative_shape: EITHER,
    shape_that_overflows_int64: EITHER,
    float_offsets: EITHER,
    entry_not_an_object: EITHER,
    metadata_not_strings: EITHER,
    name_with_a_newline: EITHER,
    shard_missing: EITHER,
    shard_is_a_fifo: EITHER,
    tensor_in_two_shards: EITHER,
    index_names_a_path: EITHER,
    index_not_json: EITHER,
    config_shapes_disagree: EITHER,
    config_not_an_object: EITHER,
    config_head_dim_not_a_number: EITHER,
    quantization_bits_zero: ("stock",),
    quantization_group_size_zero: ("stock",),
    format_version_a_string: ("packed",),
    format_version_true: ("packed",),
    layers_claims_one_too_many: ("packed",),
    layers_claims_one_too_few: ("packed",),
    layers_not_an_object: ("packed",),
    bits_the_tensors_contradict: ("packed",),
    bits_not_a_number: ("packed",),
}
PARAMS = [(case, kind) for case, kinds in CASES.items() for kind in kinds]


class _Hang(Exception):
    pass


def _within(seconds: int, call):
    """Runs call(); a hang fails the test instead of stalling the suite."""

    def alarm(*_):
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _broken_copy(checkpoints, kind, case, tmp_path) -> tuple[Path, str]:
    src = tmp_path / kind
    shutil.copytree(checkpoints[kind], src)
    return src, case(src)


@pytest.mark.parametrize("case,kind", PARAMS, ids=[f"{c.__name__}-{k}" for c, k in PARAMS])
def test_convert_refuses_in_one_line(case, kind, checkpoints, tmp_path, capsys):
    if case is unlisted_shard_mlx_lm_would_load:
        pytest.skip("the converter reads only the shards the index lists")
    src, expected = _broken_copy(checkpoints, kind, case, tmp_path)
    to = "stock" if kind == "packed" else "packed"
    code = _within(60, lambda: cli_main(["convert", str(src), str(tmp_path / "out"), "--to", to]))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("fused-moe convert: error: "), err
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case,kind", PARAMS + [(unlisted_shard_mlx_lm_would_load, k) for k in EITHER],
    ids=[f"{c.__name__}-{k}" for c, k in PARAMS] + [f"unlisted_shard_mlx_lm_would_load-{k}" for k in EITHER],
)
def test_load_refuses_in_one_line(case, kind, checkpoints, tmp_path):
    src, expected = _broken_copy(checkpoints, kind, case, tmp_path)
    with pytest.raises(ValueError) as e:
        _within(60, lambda: fm.load(str(src)))
    message = str(e.value)
    assert "\n" not in message, message
    assert re.search(expected, message), message


def test_the_untouched_copies_load_and_convert(checkpoints, tmp_path):
    """The cases above fail because of their edit, not the fixture."""
    for kind, src in checkpoints.items():
        model, _ = fm.load(str(src))
        fused = [m for m in model.modules() if isinstance(m, fm.MiniMaxMoE)]
        assert len(fused) == len(model.layers), f"{kind}: {len(fused)} fused blocks"
        summary = fm.convert(src, tmp_path / kind, to="stock" if kind == "packed" else "packed")
        assert summary.tensors > 0 and (tmp_path / kind / "config.json").is_file(), kind


# ---------------------------------------------------------------- memory

_PEAK = textwrap.dedent(
    """
    import resource, sys
    import fused_moe, mlx_lm.utils
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        if sys.argv[1] == "load":
            fused_moe.load(sys.argv[2])
        else:
            fused_moe.convert(sys.argv[2], sys.argv[3])
    except ValueError as e:
        print("refused:", e)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("grew_kb", after - before)
    """
)


@pytest.mark.parametrize("what", ["load", "convert"])
def test_a_2_gib_header_costs_no_memory(what, checkpoints, tmp_path):
    """A shard that claims a 2 GiB header, and is 2 GiB long (sparse), so the
    claim is not refuted by the file size: refused with peak RSS unchanged."""
    src = tmp_path / "src"
    shutil.copytree(checkpoints["stock"], src)
    shard = shard_of(src)
    with open(shard, "wb") as f:
        f.write(struct.pack("<Q", 2**31) + b"{")
        f.truncate(2**31 + 8)
    r = subprocess.run([sys.executable, "-c", _PEAK, what, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"refused: {shard}: corrupt or truncated safetensors file (header length 2147483648" in r.stdout, r.stdout
    grew_mb = int(r.stdout.split("grew_kb")[1]) / 1024
    print(f"\n{what}: peak RSS grew by {grew_mb:.1f} MB on a 2 GiB claimed header")
    assert grew_mb < 32
