"""The base model's weight files as one name -> location map (safetensors, or legacy .bin)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from bot.errors import IncompatibleBaseError
from bot.jsonfile import read_json_object
from bot.shards import CODE_FROM_DTYPE, TensorInfo, read_header, read_tensor
from bot.sources import index_weight_names

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class BinTensorInfo:
    """A tensor inside a legacy PyTorch checkpoint, read with ``torch.load(weights_only=True, mmap=True)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path


_BIN_CACHE: dict[Path, dict[str, torch.Tensor]] = {}


def local_weight_bytes(folder: Path) -> int:
    """The size of a local checkpoint's weight files: its safetensors, else its legacy .bin files."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in folder.glob("*.bin"))


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    if path not in _BIN_CACHE:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickle refusals and corrupt zips come as many types
            raise IncompatibleBaseError(f"{path.name} cannot be read safely ({e.__class__.__name__}); "
                                        "use a base with safetensors weights") from e
        if not isinstance(state, dict):
            raise IncompatibleBaseError(f"{path.name} does not hold a state dict")
        _BIN_CACHE.clear()  # keep one legacy shard mapped at a time
        _BIN_CACHE[path] = state
    return _BIN_CACHE[path]


def read_base_tensor(info: TensorInfo | BinTensorInfo) -> torch.Tensor:
    if isinstance(info, TensorInfo):
        return read_tensor(info)
    return _load_bin(info.file)[info.name].clone()


def weight_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            index_data = read_json_object(index, error=IncompatibleBaseError, what=f"base {index_name}",
                                          fix="fix or re-download the base")
            names = index_weight_names(index_data, f"base {index_name}")
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise IncompatibleBaseError(f"base shard {missing[0]} named in {index_name} is missing; re-download the base")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise IncompatibleBaseError(f"no model weights (model.safetensors or pytorch_model.bin) in base folder {folder}")


def index_checkpoint(folder: Path) -> tuple[dict[str, TensorInfo | BinTensorInfo], list[str]]:
    """Every tensor of the base checkpoint, in file order; also the checkpoint's dtype codes seen."""
    tensors: dict[str, TensorInfo | BinTensorInfo] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            header, _ = read_header(path)
            tensors.update(header)
        else:
            for name, t in _load_bin(path).items():
                if not isinstance(t, torch.Tensor) or t.dtype not in CODE_FROM_DTYPE:
                    continue
                tensors[name] = BinTensorInfo(name, CODE_FROM_DTYPE[t.dtype], tuple(t.shape), path)
    return tensors, sorted({t.dtype for t in tensors.values()})


@functools.lru_cache(maxsize=4)
def index_remote_checkpoint(remote) -> dict[str, TensorInfo]:
    """Every tensor of a base whose safetensors files stay on the Hub (``bot.remote.RemoteWeights``), in
    file order, from the files' headers; each ``TensorInfo.file`` is the bare file name. Read once per
    pinned base (the plan and the proof both ask): the headers are a request or two per shard, made
    eight at a time (a 70B base has 30 shards: on the Hub's ~100 ms round trips, 6 s one by one)."""
    from concurrent.futures import ThreadPoolExecutor

    from bot.remote import read_remote_header

    tensors: dict[str, TensorInfo] = {}
    with ThreadPoolExecutor(min(8, max(1, len(remote.files))), thread_name_prefix="merge-bot-header") as pool:
        for header in pool.map(lambda name: read_remote_header(remote, name, None), remote.files):
            tensors.update(header)  # in file order, as the files are listed
    return tensors
