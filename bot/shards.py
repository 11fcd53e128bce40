"""Reading and writing safetensors checkpoints one tensor at a time.

The safetensors layout is: 8-byte little-endian header length, a JSON header mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the end of the header), then the raw little-endian bytes. The library's
own writer needs every tensor in memory at once; a merge must not, so this module
reads with ``pread`` (no whole-file mmap in our RSS) and writes a pre-computed header
followed by each tensor's bytes as they are produced.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from bot.errors import IncompatibleBaseError

# safetensors dtype code <-> torch dtype.
DTYPE_FROM_CODE: dict[str, torch.dtype] = {
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_CODE.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # same ceiling the safetensors library enforces
_COPY_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in one safetensors file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_FROM_CODE[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header; return tensors (in file order) and ``__metadata__``."""
    path = Path(path)
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        header_len = header_length(prefix, path.name, path.stat().st_size)
        return parse_header(fh.read(header_len), path.stat().st_size, path)


def header_length(prefix: bytes, name: str, file_size: int) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes, checked against the file's size."""
    if len(prefix) != 8:
        raise IncompatibleBaseError(f"{name} is not a safetensors file (too short); re-download it")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise IncompatibleBaseError(f"{name} has a corrupt safetensors header; re-download it")
    return header_len


def parse_header(raw: bytes, size: int, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors and ``__metadata__`` of a safetensors file of ``size`` bytes whose JSON header is ``raw``.

    ``path`` is where the tensors' bytes will be read from (for a Hub file not fetched yet, its name).
    """
    header_len = len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IncompatibleBaseError(f"{path.name} has a corrupt safetensors header; re-download it") from e
    corrupt = IncompatibleBaseError(f"{path.name} has a corrupt safetensors header; re-download it")
    if not isinstance(header, dict):
        raise corrupt
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt
    data_start = 8 + header_len
    tensors: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            if not (_is_count(begin) and _is_count(end) and isinstance(shape, list) and all(map(_is_count, shape))):
                raise TypeError("offsets and dimensions must be non-negative integers")
            info = TensorInfo(name=name, dtype=str(entry["dtype"]), shape=tuple(shape), file=path,
                              begin=data_start + begin, end=data_start + end)
        except (KeyError, TypeError, ValueError) as e:
            raise IncompatibleBaseError(f"{path.name}: malformed header entry for tensor {name!r}") from e
        if info.dtype not in DTYPE_FROM_CODE:
            raise IncompatibleBaseError(f"{path.name}: tensor {name!r} has unsupported dtype {info.dtype}")
        expected = _numel(info.shape) * torch.empty((), dtype=info.torch_dtype).element_size()
        if not (data_start <= info.begin <= info.end <= size) or info.nbytes != expected:
            raise IncompatibleBaseError(f"{path.name}: tensor {name!r} lies outside the file; re-download it")
        tensors.append(info)
    tensors.sort(key=lambda t: t.begin)
    # Like the safetensors library: the tensors tile the data exactly, no gaps, no shared bytes.
    position = data_start
    for t in tensors + [None]:
        if (t.begin if t else size) != position:
            where = f"before tensor {t.name!r}" if t else "after the last tensor"
            raise IncompatibleBaseError(f"{path.name}: tensors overlap or leave a gap {where}; re-download it")
        position = t.end if t else size
    return {t.name: t for t in tensors}, dict(metadata)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor with ``pread`` into a fresh, writable CPU tensor."""
    tensor = torch.empty(info.shape, dtype=info.torch_dtype)
    read_into(info, 0, tensor)
    return tensor


def read_into(info: TensorInfo, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of ``info`` from ``offset`` on, with ``pread``.

    Reading a big tensor block by block into one reused buffer keeps the working set in
    cache and never touches fresh pages.
    """
    want = out.numel() * out.element_size()
    if offset < 0 or offset + want > info.nbytes or not out.is_contiguous():
        raise RuntimeError(f"cannot read {want} bytes at {offset} of {info.name} into this buffer")
    if not want:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]  # an ndarray is a buffer
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < want:
            n = os.preadv(fd, [view[done:]], info.begin + offset + done)
            if n <= 0:
                raise IncompatibleBaseError(f"{info.file.name}: file ended inside tensor {info.name!r}")
            done += n
    finally:
        os.close(fd)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint: its name, dtype and shape, before it exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_FROM_CODE[self.dtype]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()


def layout_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Fill shards in order up to a byte budget (a tensor larger than the budget gets its own)."""
    shards: list[list[OutputTensor]] = []
    current: list[OutputTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(n: int) -> list[str]:
    """transformers' names: one file is model.safetensors, else model-0000i-of-0000N.safetensors."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def index_json(shards: list[list[OutputTensor]], names: list[str]) -> dict:
    total = sum(t.nbytes for shard in shards for t in shard)
    weight_map = {t.name: name for shard, name in zip(shards, names) for t in shard}
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors arrive in order."""

    def __init__(self, path: Path, tensors: list[OutputTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._pending: Iterator[OutputTensor] = iter(tensors)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        offsets: dict[str, tuple[int, int]] = {}
        for t in tensors:
            offsets[t.name] = (offset, offset + t.nbytes)
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(offsets[t.name])}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        start = 8 + len(raw)
        self._located = {t.name: TensorInfo(t.name, t.dtype, t.shape, self.path, start + offsets[t.name][0],
                                            start + offsets[t.name][1]) for t in tensors}
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def _next(self, name: str) -> OutputTensor:
        spec = next(self._pending, None)
        if spec is None or spec.name != name:
            raise RuntimeError(f"shard writer expected {spec.name if spec else 'nothing'}, got {name}")
        return spec

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Write one tensor as consecutive pieces (row blocks, in order) whose bytes add up to it."""
        spec = self._next(name)
        written = 0
        for block in blocks:
            if block.dtype != spec.torch_dtype or block.dim() != len(spec.shape) or \
                    tuple(block.shape[1:]) != spec.shape[1:]:
                raise RuntimeError(f"{name}: planned {spec.dtype}{list(spec.shape)}, got a {block.dtype}"
                                   f"{list(block.shape)} block")
            written += self._write_bytes(block)
        if written != spec.nbytes:
            raise RuntimeError(f"{name}: planned {spec.nbytes} bytes, got {written}")

    def _write_bytes(self, tensor: torch.Tensor) -> int:
        if not tensor.numel():
            return 0
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))  # type: ignore[arg-type]  # an ndarray is a buffer
        return data.nbytes

    def written(self, name: str) -> TensorInfo:
        """Where tensor ``name``, already written, lies in this file (flushed, so it can be read back)."""
        self._fh.flush()
        return self._located[name]

    def copy_raw(self, name: str, source: TensorInfo) -> None:
        """Pass a tensor through byte for byte, kernel to kernel, never through our memory."""
        spec = next(self._pending, None)
        if spec is None or spec.name != name or spec.dtype != source.dtype or spec.shape != source.shape:
            raise RuntimeError(f"shard writer cannot copy {source.name} as {name}")
        self._fh.flush()
        out_fd = self._fh.fileno()
        with open(source.file, "rb") as src:
            offset, left = source.begin, source.nbytes
            while left:
                try:
                    n = os.copy_file_range(src.fileno(), out_fd, min(left, _COPY_CHUNK), offset)
                except OSError:  # e.g. EXDEV across file systems: copy through a small buffer
                    n = len(chunk := os.pread(src.fileno(), min(left, _COPY_CHUNK), offset))
                    view = memoryview(chunk)
                    while view:  # a nearly full disk may take part of a write
                        view = view[os.write(out_fd, view):]
                if n <= 0:
                    raise IncompatibleBaseError(f"{source.file.name}: file ended inside tensor {source.name!r}")
                offset += n
                left -= n
        self._fh.seek(0, os.SEEK_END)

    def close(self) -> None:
        leftover = next(self._pending, None)
        self._fh.close()
        if leftover is not None:
            raise RuntimeError(f"shard {self.path.name} closed before {leftover.name} was written")

    def abort(self) -> None:
        """Close after a failure: the half-written file is left to the staging folder's clean-up."""
        try:
            self._fh.close()
        except OSError:  # e.g. the disk filled while flushing: the original failure is the one to report
            pass


