"""A plain reader of a GGUF file's header: metadata entries and tensor infos, no tensor data.

Layout (little-endian, version 2 and 3)::

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string | value_type u32 | value)
    n_tensors x (name: string | n_dims u32 | dims u64[n_dims] | ggml_type u32 | offset u64)
    padding to `general.alignment` (default 32) | tensor data, each tensor aligned

Each metadata entry keeps its raw bytes, so a writer can copy it unchanged. String arrays
(the 49k-token vocabulary) are skipped over, not decoded: reading a header stays cheap.
"""

from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from merge_core.errors import SelfMergeError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format of one scalar (STRING=8 and ARRAY=9 are handled apart).
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class MetadataEntry:
    key: str
    value_type: int
    item_type: int | None  # element type of an array
    value: object  # scalar, str, numpy array of numbers, or None for an array of strings
    raw: bytes  # the whole entry as stored: key, type and value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # as stored (fastest-varying first, ggml order)
    ggml_type: int
    offset: int  # relative to the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, MetadataEntry]
    tensors: tuple[TensorInfo, ...]
    data_start: int  # absolute file offset of the data section
    alignment: int

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"].value)

    @property
    def block_count(self) -> int:
        return int(self.metadata[f"{self.architecture}.block_count"].value)


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise SelfMergeError(f"{self.path} is truncated: its GGUF header runs past the end of the file")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Step over ``count`` strings (a vocabulary: ~100k of them) in one tight loop."""
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            raise SelfMergeError(f"{self.path} is truncated: its GGUF header runs past the end of the file")
        self.pos = pos

    def value(self, value_type: int) -> tuple[object, int | None]:
        if value_type in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[value_type]), None
        if value_type == STRING:
            return self.string(), None
        if value_type == ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in NUMPY_DTYPES:
                dtype = np.dtype(NUMPY_DTYPES[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy(), item_type
            if item_type == STRING:
                self.skip_strings(count)
                return None, item_type
            raise SelfMergeError(f"{self.path}: unsupported GGUF array item type {item_type}")
        raise SelfMergeError(f"{self.path}: unknown GGUF value type {value_type}")


def tensor_n_bytes(dims: tuple[int, ...], ggml_type: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return n_elements // block_size * type_size


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor infos of the GGUF at ``path``; raise SelfMergeError if it is none.

    Read once per file as it is now (path, size and modification time): a sweep merges from the same
    sources every trial, and a header of many tensors and a large vocabulary takes tens of milliseconds
    to parse. The header is shared between callers: read it, never change it."""
    path = Path(path)
    if not path.is_file():
        raise SelfMergeError(f"model file not found: {path}")
    stat = path.stat()
    return _read_header(path.resolve(), stat.st_size, stat.st_mtime_ns, path)


@functools.lru_cache(maxsize=16)  # a sweep's sources, and the odd merged file read back
def _read_header(resolved: Path, size: int, mtime_ns: int, path: Path) -> GGUFHeader:
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise SelfMergeError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(_Cursor(view, path), path)
            finally:
                view.release()


def _parse(cur: _Cursor, path: Path) -> GGUFHeader:
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise SelfMergeError(f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, MetadataEntry] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string()
        value_type = cur.scalar("<I")
        value, item_type = cur.value(value_type)
        metadata[key] = MetadataEntry(key, value_type, item_type, value, bytes(cur.buf[start : cur.pos]))
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = tuple(struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims)))
        ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
        tensors.append(TensorInfo(name, dims, ggml_type, offset, tensor_n_bytes(dims, ggml_type)))
    alignment = int(metadata["general.alignment"].value) if "general.alignment" in metadata else DEFAULT_ALIGNMENT
    data_start = align_up(cur.pos, alignment)
    if "general.architecture" not in metadata:
        raise SelfMergeError(f"{path}: GGUF has no general.architecture entry")
    return GGUFHeader(path, version, metadata, tuple(tensors), data_start, alignment)


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
