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


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> int:
    """Write ``(name, array)`` pairs to ``path`` without copying the arrays; returns the data size."""
    items = [(name, np.ascontiguousarray(arr)) for name, arr in tensors]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in items:
        if arr.dtype not in CODES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to safetensors")
        header[name] = {"dtype": CODES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in items:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return offset
