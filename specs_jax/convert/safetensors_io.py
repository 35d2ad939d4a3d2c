"""Streaming reads and writes of the safetensors format, tensor by tensor.

The ``safetensors`` package reads through a memory map (whose pages count in the process's RSS
until the file is closed) and its writer copies every tensor into a bytes object first. For
conversion of multi-GB checkpoints we want neither, so this module reads each tensor with one
``readinto`` into its own numpy buffer and writes each tensor's buffer straight to the file.
The byte format is the documented one: ``u64`` little-endian header size, a JSON header
``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, NamedTuple

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class TensorInfo(NamedTuple):
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Names, dtypes, shapes and byte ranges of the tensors in one ``.safetensors`` file."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    base = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        out[name] = TensorInfo(path, DTYPES[entry["dtype"]], tuple(entry["shape"]), base + start, end - start)
    return out


def read_tensor(info: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """Read one tensor, into ``out`` (a C-contiguous array of its shape and dtype) when given."""
    if out is None:
        out = np.empty(info.shape, info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    if view.nbytes != info.nbytes:
        raise ValueError(f"{info.file}: tensor bytes {info.nbytes} != {info.shape} x {info.dtype}")
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start)
        done = 0
        while done < info.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{info.file}: truncated tensor data")
            done += n
    return out


class StreamWriter:
    """Write a safetensors file whose tensor list (names, dtypes, shapes) is known up front, one
    tensor at a time in that order, so only the tensor being written needs to be in memory."""

    def __init__(self, path: str | Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in entries:
            dtype = np.dtype(dtype)
            if dtype not in CODES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
        self.pending = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in entries]
        self.nbytes = offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)))
        self.file.write(blob)

    def write(self, name: str, arr: np.ndarray) -> None:
        if not self.pending:
            raise ValueError(f"tensor {name!r}: nothing more was declared for {self.file.name}")
        want = self.pending.pop(0)
        if (name, arr.dtype, tuple(arr.shape)) != want:
            raise ValueError(f"expected tensor {want}, got {(name, arr.dtype, tuple(arr.shape))}")
        self.file.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise ValueError(f"{self.file.name}: {len(self.pending)} declared tensors were not written")

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.file.close()


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, array)`` pairs to ``path`` without copying the arrays; returns the data size."""
    items = list(tensors)
    with StreamWriter(path, [(n, a.dtype, a.shape) for n, a in items], metadata) as writer:
        for name, arr in items:
            writer.write(name, arr)
    return writer.nbytes
