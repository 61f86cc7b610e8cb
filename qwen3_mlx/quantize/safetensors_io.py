"""Piecewise safetensors reading and writing, so conversion memory does not grow with model size.

Reading uses `os.pread` on byte ranges (no mmap: mapped pages would count towards resident memory).
Writing lays out a shard's header first, from the planned tensor shapes, then fills each tensor's byte
range as its pieces are produced.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ModelLoadError, Qwen3MLXError
from ..loader import read_safetensors_header

# safetensors dtype name -> (mlx dtype, bytes per element, numpy dtype holding the raw bits)
DTYPES: dict[str, tuple[mx.Dtype, int, type]] = {
    "BF16": (mx.bfloat16, 2, np.uint16),
    "F16": (mx.float16, 2, np.float16),
    "F32": (mx.float32, 4, np.float32),
    "U32": (mx.uint32, 4, np.uint32),
    "I64": (mx.int64, 8, np.int64),  # qwen4_exp's n-gram hash constants
}
FLOAT_SOURCE_DTYPES = ("BF16", "F16", "F32")
MX_TO_ST = {v[0]: k for k, v in DTYPES.items()}


def dtype_size(dtype: mx.Dtype) -> int:
    return DTYPES[MX_TO_ST[dtype]][1]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live in a source file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the leading axis."""
        return math.prod(self.shape[1:]) * DTYPES[self.dtype][1]


def scan(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor of the given safetensors files, validated (truncation, dtype) without reading data."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        header = read_safetensors_header(f)
        with open(f, "rb") as fh:
            base = 8 + struct.unpack("<Q", fh.read(8))[0]
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = meta.get("dtype")
            if dtype not in DTYPES:
                raise ModelLoadError(f"tensor {name} in {f.name} has unsupported dtype {dtype}")
            shape = tuple(meta["shape"])
            start, end = meta["data_offsets"]
            info = TensorInfo(f, name, dtype, shape, base + start)
            if end - start != info.nbytes:
                raise ModelLoadError(f"tensor {name} in {f.name} has {end - start} bytes for shape {shape}")
            if name in infos:
                raise ModelLoadError(f"tensor {name} appears in both {infos[name].file.name} and {f.name}")
            infos[name] = info
    return infos


class Reader:
    """Reads row ranges of source tensors; keeps one open file descriptor per file."""

    def __init__(self):
        self._fds: dict[Path, int] = {}

    def rows(self, info: TensorInfo, r0: int = 0, r1: int | None = None) -> mx.array:
        """Rows [r0, r1) of `info` along its first axis, in the stored dtype."""
        if not info.shape:
            r0, r1, shape = 0, 1, ()
        else:
            r1 = info.shape[0] if r1 is None else r1
            shape = (r1 - r0, *info.shape[1:])
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        n = (r1 - r0) * info.row_bytes if info.shape else info.nbytes
        data = os.pread(fd, n, info.start + r0 * info.row_bytes)
        if len(data) != n:
            raise ModelLoadError(f"{info.file.name} ended while reading {info.name}")
        mx_dtype, _, np_dtype = DTYPES[info.dtype]
        a = mx.array(np.frombuffer(data, dtype=np_dtype).reshape(shape))
        return a.view(mx_dtype) if info.dtype == "BF16" else a

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The encoded header (length prefix included) and each tensor's data offset, in the given order."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offsets, pos = {}, 0
    for t in tensors:
        offsets[t.name] = pos
        header[t.name] = {"dtype": MX_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned, like the reference writer
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardWriter:
    """One output shard: header written on open, tensor bytes filled in piecewise with `write`."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None):
        self.path = path
        head, self._offsets = header_bytes(tensors, metadata)
        self._sizes = {t.name: t.nbytes for t in tensors}
        self._data_start = len(head)
        self._written = 0
        self.size = len(head) + sum(self._sizes.values())
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self._release()
            raise

    def write(self, name: str, offset: int, data: mx.array) -> None:
        """Write the bytes of (evaluated) `data` at byte `offset` within tensor `name`."""
        buf = memoryview(data).cast("B")
        if offset + buf.nbytes > self._sizes[name]:
            raise ValueError(f"write past the end of {name}")
        os.pwrite(self._fd, buf, self._data_start + self._offsets[name] + offset)
        self._written += buf.nbytes

    def close(self) -> None:
        """Close the file; raises if any tensor byte was left unwritten."""
        self._release()
        expected = self.size - self._data_start
        if self._written != expected:
            raise RuntimeError(f"{self.path.name}: wrote {self._written} of {expected} data bytes")

    def _release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # a failed write: release the descriptor, keep the original error (the shard is discarded)
            self._release()


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '40KB' or a byte count -> bytes (decimal units, like transformers)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise Qwen3MLXError(f"cannot read size {text!r} (use e.g. 5GB, 500MB)") from None
