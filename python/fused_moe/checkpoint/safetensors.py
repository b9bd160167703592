"""Reading and writing safetensors files without loading whole files.

The format: an 8-byte little-endian header length, a JSON header that maps
each tensor name to its dtype, shape and byte range in the data section, then
the data. A checkpoint splits its tensors over several such files, listed in
an index. We parse the header ourselves, which lets us check a file before
converting anything, read one tensor (or one expert of a stacked tensor) at a
time, read F8_E4M3 tensors as raw bytes, and write each tensor into its place
in a file as soon as it is computed, so memory never holds a whole file.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx
import numpy as np

from fused_moe.errors import CheckpointError

# safetensors dtype name -> (MLX dtype the bytes are read as, bytes per element).
# F8_E4M3 has no MLX dtype: it is read as its uint8 codes (see mx.from_fp8).
DTYPES = {
    "BOOL": (mx.bool_, 1),
    "U8": (mx.uint8, 1),
    "I8": (mx.int8, 1),
    "F8_E4M3": (mx.uint8, 1),
    "U16": (mx.uint16, 2),
    "I16": (mx.int16, 2),
    "F16": (mx.float16, 2),
    "BF16": (mx.bfloat16, 2),
    "U32": (mx.uint32, 4),
    "I32": (mx.int32, 4),
    "F32": (mx.float32, 4),
    "U64": (mx.uint64, 8),
    "I64": (mx.int64, 8),
    "F64": (mx.float64, 8),
}
_NAME_OF = {mx_dtype: name for name, (mx_dtype, _) in DTYPES.items() if name != "F8_E4M3"}
_NUMPY_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# The largest header we accept; real ones are a few MB at most.
_MAX_HEADER_BYTES = 100 << 20
# Raw copies move this many bytes at a time.
_COPY_CHUNK = 64 << 20


def dtype_name(dtype: mx.Dtype) -> str:
    return _NAME_OF[dtype]


def itemsize(name: str) -> int:
    return DTYPES[name][1]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def load_json(raw: bytes | str, where) -> object:
    """Parses untrusted JSON (a safetensors header, an index, a config):
    UTF-8 only, no duplicate keys, and any failure (nesting deep enough to
    exhaust the parser included) is a one-line CheckpointError naming `where`."""

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice")
            seen[key] = value
        return seen

    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None


def _is_count(value) -> bool:
    """A non-negative JSON integer (JSON true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry's dtype, shape and data range, each checked for type
    and range before any arithmetic is done with it."""
    name = printable(name)
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name}: {_short(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(
            f"{path}: tensor {name} has unsupported dtype {_short(dtype)}; supported: {', '.join(DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name} has a bad shape {_short(shape)} (non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name} has bad data_offsets {_short(offsets)} (two non-negative integers)")
    begin, end = offsets
    # Python integers: a shape cannot overflow its way to a small byte count.
    expected = itemsize(dtype) * prod(shape)
    if begin > end or end - begin != expected:
        raise CheckpointError(
            f"{path}: corrupt header: tensor {name} {dtype} {shape} needs "
            f"{expected} bytes but spans [{begin}, {end})"
        )
    return dtype, tuple(shape), begin, end


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(name: str, limit: int = 200) -> str:
    """A name from an untrusted file as it may appear in a one-line message."""
    return name if name.isprintable() and len(name) <= limit else _short(name, limit)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parses and checks the header of one safetensors file: every tensor's
    byte range must match its shape and dtype, the ranges must tile the data
    section, and the file must be exactly as long as the header says. Nothing
    is allocated from an untrusted number before it is checked against the
    file's size."""
    path = Path(path)
    try:
        # Checked before opening: opening a FIFO would wait for a writer.
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length "
                    f"{header_len}, file size {size}, at most {_MAX_HEADER_BYTES} accepted)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    header = load_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + header_len
    tensors = {}
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _entry(path, name, entry)
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, data_start + end)
        ranges.append((begin, end, name))
    ranges.sort()
    pos = 0
    for begin, end, name in ranges:
        if begin != pos:
            raise CheckpointError(
                f"{path}: corrupt header: tensor {printable(name)} starts at byte {begin} of the data, "
                f"expected {pos} (tensors overlap or leave a gap)"
            )
        pos = end
    if data_start + pos > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {printable(ranges[-1][2])} ends at byte "
            f"{data_start + pos}, the file has {size}"
        )
    if data_start + pos < size:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: the header describes {data_start + pos} "
            f"bytes, the file has {size}"
        )
    return tensors


def read_tensor(info: TensorInfo, index: int | None = None) -> mx.array:
    """Reads a tensor, or only `tensor[index]` of its leading axis, from disk.
    F8_E4M3 tensors come back as their uint8 codes."""
    dtype, size = DTYPES[info.dtype]
    shape = info.shape
    begin, nbytes = info.begin, info.nbytes
    if index is not None:
        if not shape or not 0 <= index < shape[0]:
            raise IndexError(f"{info.file}: index {index} out of range for shape {list(shape)}")
        nbytes //= shape[0]
        begin += index * nbytes
        shape = shape[1:]
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(info.file, "rb") as f:
        f.seek(begin)
        if f.readinto(memoryview(buf)) != nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading a tensor at byte {begin}")
    a = mx.array(buf.view(_NUMPY_UINT[size]))
    if a.dtype != dtype:
        a = a.view(dtype)
    return a.reshape(shape)


def read_slice(info: TensorInfo, axis: int, start: int, stop: int) -> mx.array:
    """Reads ``tensor[..., start:stop, ...]`` (along `axis`) from disk, touching
    only the bytes of the slice where the layout allows: a rank's share of a
    tensor, without the rest of it in memory."""
    dtype, size = DTYPES[info.dtype]
    axis %= len(info.shape)
    if not 0 <= start <= stop <= info.shape[axis]:
        raise IndexError(f"{info.file}: slice [{start}, {stop}) of axis {axis} out of range for shape {list(info.shape)}")
    mapped = np.memmap(info.file, dtype=_NUMPY_UINT[size], mode="r", offset=info.begin, shape=info.shape)
    index = [slice(None)] * len(info.shape)
    index[axis] = slice(start, stop)
    a = mx.array(np.ascontiguousarray(mapped[tuple(index)]))
    del mapped
    return a.view(dtype) if a.dtype != dtype else a


@dataclass
class _Planned:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: int
    begin: int  # absolute offset in its file
    nbytes: int
    written: set  # leading indices written, or {None} when written whole


class CheckpointWriter:
    """Writes a planned set of tensors into files of at most `max_file_bytes`
    (a larger tensor gets a file of its own), plus the index.

    Every tensor's name, dtype and shape is known before any data is written,
    so each file's header is written first and each tensor (or each slice
    of its leading axis) is written straight into its place and then released.
    """

    def __init__(self, directory: Path, tensors, max_file_bytes: int, metadata: dict):
        self.directory = Path(directory)
        groups: list[list[tuple[str, str, tuple]]] = []
        size = 0
        for name, dtype, shape in tensors:
            nbytes = itemsize(dtype) * int(np.prod(shape, dtype=np.int64))
            if not groups or (size + nbytes > max_file_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append((name, dtype, tuple(shape)))
            size += nbytes
        count = len(groups)
        self.files = [self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.planned: dict[str, _Planned] = {}
        self._fds: dict[int, int] = {}
        self._open_bytes: dict[int, int] = {}
        for i, members in enumerate(groups):
            # Wider dtypes first, so every tensor starts aligned to its element.
            members.sort(key=lambda t: -itemsize(t[1]))
            header, pos = {"__metadata__": metadata}, 0
            for name, dtype, shape in members:
                nbytes = itemsize(dtype) * int(np.prod(shape, dtype=np.int64))
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
                self.planned[name] = _Planned(name, dtype, shape, i, pos, nbytes, set())
                pos += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            for name, *_ in members:
                self.planned[name].begin += 8 + len(raw)
            fd = os.open(self.files[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + pos)
            self._fds[i] = fd
            self._open_bytes[i] = pos
        self.total_bytes = sum(p.nbytes for p in self.planned.values())

    def _slot(self, name: str, index: int | None, dtype: mx.Dtype, shape) -> tuple[_Planned, int, int]:
        p = self.planned.get(name)
        if p is None:
            raise RuntimeError(f"internal error: tensor {name} was not planned")
        want_shape = p.shape if index is None else p.shape[1:]
        if dtype_name(dtype) != p.dtype or tuple(shape) != want_shape:
            raise RuntimeError(
                f"internal error: tensor {name}{'' if index is None else f'[{index}]'} is "
                f"{dtype_name(dtype)} {list(shape)}, planned {p.dtype} {list(want_shape)}"
            )
        if index in p.written or (index is not None and None in p.written) or (index is None and p.written):
            raise RuntimeError(f"internal error: tensor {name} written twice")
        if index is None:
            return p, p.begin, p.nbytes
        n = p.nbytes // p.shape[0]
        return p, p.begin + index * n, n

    def _wrote(self, p: _Planned, index, nbytes: int) -> None:
        p.written.add(index)
        self._open_bytes[p.file] -= nbytes
        if self._open_bytes[p.file] == 0:
            fd = self._fds.pop(p.file)
            os.fsync(fd)
            os.close(fd)

    def write(self, name: str, array: mx.array, index: int | None = None) -> None:
        """Writes `array` as tensor `name`, or as `name[index]`."""
        array = mx.contiguous(array)
        mx.eval(array)
        p, offset, nbytes = self._slot(name, index, array.dtype, array.shape)
        view = memoryview(array).cast("B")
        if view.nbytes != nbytes:
            raise RuntimeError(f"internal error: tensor {name} has {view.nbytes} bytes, planned {nbytes}")
        _pwrite_all(self._fds[p.file], view, offset)
        self._wrote(p, index, nbytes)

    def copy(self, name: str, source: TensorInfo) -> None:
        """Copies a source tensor's bytes unchanged, in chunks."""
        p, offset, nbytes = self._slot(name, None, DTYPES[source.dtype][0], source.shape)
        if source.dtype != p.dtype:
            raise RuntimeError(f"internal error: copying {source.dtype} into {p.dtype} tensor {name}")
        with open(source.file, "rb") as f:
            done = 0
            while done < nbytes:
                f.seek(source.begin + done)
                chunk = f.read(min(_COPY_CHUNK, nbytes - done))
                if not chunk:
                    raise CheckpointError(f"{source.file}: truncated while copying tensor {name}")
                _pwrite_all(self._fds[p.file], memoryview(chunk), offset + done)
                done += len(chunk)
        self._wrote(p, None, nbytes)

    def finish(self) -> None:
        """Checks that every planned tensor was written whole, then writes the index."""
        for p in self.planned.values():
            complete = p.written == {None} or (p.shape and p.written == set(range(p.shape[0])))
            if not complete:
                raise RuntimeError(f"internal error: tensor {p.name} was not completely written")
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {n: self.files[p.file].name for n, p in sorted(self.planned.items())},
        }
        with open(self.directory / INDEX_NAME, "w") as f:
            json.dump(index, f, indent=4)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


INDEX_NAME = "model.safetensors.index.json"


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
