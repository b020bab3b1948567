"""Safetensors shards written atomically and read row by row with `os.pread` (no mmap, no whole-file load).

Why pread and not `safe_open` (mmap): every page of a memory-mapped file that training touches counts in the
process's resident set until the kernel drops it, so reading a cache larger than RAM through mmap makes RSS grow
with the cache. A pread goes through the page cache, which the kernel evicts as it needs, and the process only
holds the rows of the current batch. A safetensors file is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} (+ "__metadata__": {str: str}) and the raw row-major bytes, so row i of a
tensor of shape (n, ...) is one contiguous range.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def write_shard(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` atomically: a temporary file in the same folder, fsync, then rename.

    A crash or kill -9 leaves either the whole file or none (plus, at worst, a `*.tmp-<pid>` file that the next
    build removes), so "the file exists" means "this shard is complete".
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class ShardFile:
    """One safetensors file: the header is parsed once, rows are read on demand with pread.

    Picklable (DataLoader workers): the file descriptor is opened lazily in each process and never pickled.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.base = 8 + length
        self.tensors = {
            name: (DTYPES[h["dtype"]], tuple(h["shape"]), *h["data_offsets"]) for name, h in header.items()
        }
        self._fd, self._pid = None, None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None, _pid=None)

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def _read(self, size: int, offset: int) -> bytearray:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self._fd, size, self.base + offset)
        if len(data) != size:
            raise OSError(f"{self.path}: truncated shard (wanted {size} bytes at {self.base + offset})")
        return bytearray(data)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def rows(self, name: str) -> int:
        return self.tensors[name][1][0]

    def row(self, name: str, i: int) -> torch.Tensor:
        """Row i of tensor `name` (n, ...) -> (...), a fresh tensor (not a view of shared memory)."""
        dtype, shape, begin, end = self.tensors[name]
        if not 0 <= i < shape[0]:
            raise IndexError(f"{self.path}: row {i} of {name} {list(shape)}")
        size = (end - begin) // shape[0]
        return torch.frombuffer(self._read(size, begin + i * size), dtype=dtype).reshape(shape[1:])

    def column(self, name: str) -> torch.Tensor:
        """The whole tensor `name` (n, ...)."""
        dtype, shape, begin, end = self.tensors[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._read(end - begin, begin), dtype=dtype).reshape(shape)
