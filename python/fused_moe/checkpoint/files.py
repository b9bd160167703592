"""A checkpoint directory's files: config.json, the index and the
safetensors files it names, the tokenizer. Every file is untrusted input:
read with size limits, checked against each other, and refused in one line
that names the file."""

from __future__ import annotations

import stat
from pathlib import Path

from fused_moe.checkpoint.safetensors import INDEX_NAME, TensorInfo, load_json, printable, read_header
from fused_moe.errors import CheckpointError

# A checkpoint's tokenizer is one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken", "tiktoken.model")
# Files a conversion copies unchanged next to the weights.
COPIED_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "*.tiktoken", "tiktoken.model", "chat_template*", "generation_config.json",
)


def read_checkpoint(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory, after checking that the index
    and the safetensors files agree. Without an index, every *.safetensors file counts."""
    index_file = path / INDEX_NAME
    if index_file.exists():
        index = load_json(_read_bytes(index_file), index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: corrupt index (no \"weight_map\" object)")
        for tensor, name in weight_map.items():
            # A listed file lies in this directory: no paths, so an index
            # cannot make us read /etc/passwd or ../other-model.
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(
                    f"{index_file}: tensor {printable(tensor)} is placed in {printable(repr(name))}, "
                    f"which is not a file name in {path}"
                )
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no {INDEX_NAME} and no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{index_file}: lists file {name}, which does not exist in {path}")
        for tensor, info in read_header(file).items():
            if tensor in tensors:
                raise CheckpointError(f"{file}: tensor {tensor} is also in {tensors[tensor].file.name}")
            if weight_map is not None and weight_map.get(tensor) != name:
                where = weight_map.get(tensor)
                raise CheckpointError(
                    f"{file}: holds tensor {tensor}, which the index "
                    + (f"places in {where}" if where else "does not list")
                )
            tensors[tensor] = info
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in tensors:
                raise CheckpointError(f"{index_file}: lists tensor {tensor} in {name}, which does not hold it")
    return tensors


# config.json and the index are a few MB at most.
_MAX_JSON_BYTES = 100 << 20


def _read_bytes(path: Path) -> bytes:
    """A small JSON file's bytes, refusing (before reading) one too large."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        size = st.st_size
        if size > _MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {size} bytes; at most {_MAX_JSON_BYTES} accepted")
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e


def read_config(path: Path) -> dict:
    """A checkpoint directory's config.json, parsed as untrusted input."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    config = load_json(_read_bytes(config_file), config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    return config


def has_tokenizer(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES)
