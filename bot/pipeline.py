"""Hub to Hub with bounded disk: base pieces fetched ahead, shards merged, each shard uploaded as it closes.

Three things run at once, each bounded:

- ``PieceFetcher`` downloads the base in contiguous byte ranges (``piece_bytes_for``: many
  tensors per request, each split into a few parallel parts) into scratch files, at most
  ``PREFETCH`` pieces ahead of the merge; a piece is deleted once its last tensor is merged (and proved).
- the merge (the calling thread) writes output shards in order (``bot.merge.stream_merge``),
  proving each tensor against PEFT as it is written (``bot.proof``);
- ``bot.hub.Publication`` (``UPLOADS_AT_ONCE`` threads) pre-uploads each closed shard (LFS or
  Xet) and deletes it; the merge waits while that many shards are still uploading.

Scratch disk therefore peaks at about ``PREFETCH`` pieces plus ``1 + UPLOADS_AT_ONCE`` output
shards, whatever the model's size (``scratch_bytes``), and download, merge and upload overlap.
Both transfers use several streams (``RANGE_STREAMS`` range requests, ``UPLOADS_AT_ONCE``
uploads): one HTTP stream rarely fills a link. The merge runs on half the cores
(``merge_threads_beside_transfers``), so the transfers are never starved of CPU.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Callable, Iterator

from bot.errors import OutputError
from bot.plan import TensorJob
from bot.shards import TensorInfo

log = logging.getLogger(__name__)

# One range request: a 32nd of the base, between 32 MiB and 512 MiB (a 70B base is ~280 requests: the
# Hub rate-limits /resolve); a tensor larger than this is a piece of its own.
PIECE_BYTES = 512 * 1024 * 1024
PIECE_MIN = 32 * 1024 * 1024
PREFETCH = 2  # pieces on disk at once: the one being merged and the next one downloading
_SMALL_FILES = 64 * 1024 * 1024  # config, tokenizer, card, report: generous


def piece_bytes_for(base_bytes: int) -> int:
    """The range-request size for a base of ``base_bytes``: a 32nd of it, within [PIECE_MIN, PIECE_BYTES]."""
    return min(PIECE_BYTES, max(PIECE_MIN, base_bytes // 32))


def scratch_bytes(max_shard_bytes: int, largest_tensor: int = 0, base_bytes: int | None = None) -> int:
    """Peak scratch disk of a streamed publish: fetched pieces, the shard being written and the ones
    being uploaded, and the small files."""
    from bot.hub import UPLOADS_AT_ONCE

    piece = PIECE_BYTES if base_bytes is None else piece_bytes_for(base_bytes)
    piece = max(piece, largest_tensor)  # a tensor larger than a piece is fetched whole
    return PREFETCH * piece + (1 + UPLOADS_AT_ONCE) * max(max_shard_bytes, largest_tensor) + _SMALL_FILES


@dataclass
class Piece:
    file: str  # the base's file name on the Hub
    start: int
    end: int
    names: list[str] = field(default_factory=list)  # output tensors that read from this piece
    path: Path | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    left: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def plan_pieces(jobs: list[TensorJob], piece_bytes: int | None = None) -> list[Piece]:
    """Group the jobs' base tensors, in the order the merge reads them, into contiguous byte ranges.

    Consecutive tensors of one file that follow each other share a piece up to ``piece_bytes``; a
    tensor read out of order (an untied head that starts from the input embedding) gets its own.
    """
    if piece_bytes is None:
        piece_bytes = piece_bytes_for(sum(j.source.nbytes for j in jobs if isinstance(j.source, TensorInfo)))
    pieces: list[Piece] = []
    for job in jobs:
        source = job.source
        if not isinstance(source, TensorInfo):
            continue
        last = pieces[-1] if pieces else None
        if last is not None and last.file == source.file.name and last.start <= source.begin and source.end <= last.end:
            last.names.append(job.name)  # already inside (the same tensor read twice)
        elif (last is not None and last.file == source.file.name and source.begin == last.end
              and source.end - last.start <= piece_bytes):
            last.end = source.end
            last.names.append(job.name)
        else:
            pieces.append(Piece(source.file.name, source.begin, source.end, [job.name]))
    for piece in pieces:
        piece.left = len(piece.names)
    return pieces


ByteCounter = Callable[[int], None]


@dataclass
class _PieceFetch:
    """One piece being fetched: its open file and how many of its parts are still running or written."""

    piece: Piece
    path: Path
    handle: IO[bytes]
    left: int
    written: int = 0

    def __post_init__(self) -> None:
        self.parts = self.left


class PieceFetcher:
    """Fetches the pieces of a remote base in order, ``prefetch`` ahead, and hands the merge local tensors.

    Each piece is split into parts (``bot.remote.split_range``) fetched by ``RANGE_STREAMS`` threads
    that take parts in order across pieces, so the next piece starts while the last parts of this
    one finish; a piece is ready when all its parts are written."""

    def __init__(self, remote, jobs: list[TensorJob], scratch: Path, *, piece_bytes: int | None = None,
                 prefetch: int = PREFETCH, on_bytes: ByteCounter | None = None):
        self.remote = remote
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.pieces = plan_pieces(jobs, piece_bytes)
        self.total_bytes = sum(p.nbytes for p in self.pieces)
        self._piece_of: dict[str, Piece] = {}
        for piece in self.pieces:
            for name in piece.names:
                self._piece_of.setdefault(name, piece)
        self._slots = threading.Semaphore(prefetch)
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._on_bytes = on_bytes
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="merge-bot-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from bot.remote import RANGE_STREAMS, split_range

        pool = ThreadPoolExecutor(RANGE_STREAMS, thread_name_prefix="merge-bot-range")
        handles = []
        try:
            for i, piece in enumerate(self.pieces):
                while not self._slots.acquire(timeout=0.2):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                path = self.scratch / f"piece-{i:05d}"
                handle = open(path, "wb")
                handles.append(handle)
                handle.truncate(piece.nbytes)
                parts = split_range(piece.start, piece.end)
                fetch = _PieceFetch(piece, path, handle, left=len(parts))
                for part in parts:
                    pool.submit(self._fetch_part, fetch, part)
        except BaseException as e:  # handed to the merge thread, which raises it
            self._fail(e)
        finally:
            pool.shutdown(wait=True, cancel_futures=self._stop.is_set())
            for handle in handles:  # parts cancelled before they ran never closed theirs
                handle.close()

    def _fetch_part(self, fetch: "_PieceFetch", part: tuple[int, int]) -> None:
        from bot.remote import FetchStopped, fetch_part

        piece, written = fetch.piece, False
        try:
            fetch_part(self.remote, piece.file, part[0], part[1], fetch.handle.fileno(), part[0] - piece.start,
                       self._on_bytes, stopped=self._stop.is_set)
            written = True
        except FetchStopped:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            with self._lock:
                fetch.left -= 1
                fetch.written += written
                done = fetch.left == 0
            if done:
                fetch.handle.close()
                if fetch.written == fetch.parts and self._error is None:  # every byte is there
                    piece.path = fetch.path
                    piece.ready.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._stop.set()
        for piece in self.pieces:
            piece.ready.set()

    def localize(self, job: TensorJob) -> TensorJob:
        """``job`` reading its base tensor from the downloaded piece (waits for it)."""
        piece = self._piece_of.get(job.name)
        if piece is None:
            return job
        while not piece.ready.wait(0.5):
            if not self._thread.is_alive() and not piece.ready.is_set():
                raise OutputError("the base download stopped unexpectedly; nothing was committed; retry")
        if self._error is not None:
            raise self._error
        source = job.source
        assert isinstance(source, TensorInfo)  # plan_pieces gives pieces to safetensors tensors only
        local = replace(source, file=piece.path, begin=source.begin - piece.start, end=source.end - piece.start)
        return replace(job, source=local)

    def ready(self, job: TensorJob) -> bool:
        """Whether ``localize(job)`` would return at once (its piece is fetched, or it needs none)."""
        piece = self._piece_of.get(job.name)
        return piece is None or piece.ready.is_set()

    def localize_info(self, info: TensorInfo) -> TensorInfo | None:
        """``info`` (a tensor of a Hub file) read from a fetched piece that holds it now; None if none does."""
        for piece in self.pieces:
            if piece.path is not None and piece.ready.is_set() and piece.file == info.file.name \
                    and piece.start <= info.begin and info.end <= piece.end and piece.path.exists():
                return replace(info, file=piece.path, begin=info.begin - piece.start, end=info.end - piece.start)
        return None

    def release(self, job: TensorJob) -> None:
        """The merge is done with ``job``'s base tensor; a piece whose tensors are all merged is deleted."""
        piece = self._piece_of.get(job.name)
        if piece is None:
            return
        piece.left -= 1
        if piece.left == 0 and piece.path is not None:
            piece.path.unlink(missing_ok=True)
            self._slots.release()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def available_cores() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota when one is set
    (how containers and Spaces give a job 2 vCPUs of a large host, which ``os.cpu_count()`` and
    torch's default thread count do not see)."""
    import math
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "quota period"
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            text = Path(quota_file).read_text().split()
            quota, period = (text[0], text[1]) if period_file is None else (text[0], Path(period_file).read_text())
            if quota not in ("max", "-1"):
                return max(1, min(cores, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cores)


@contextmanager
def merge_threads_beside_transfers() -> Iterator[None]:
    """Torch's threads, while a merge shares the machine with its own downloads and uploads: half the
    cores, at least one. Idle OpenMP workers spin waiting for the next operation, so with a worker
    on every core the transfer threads starve: on 2 cores the 1.1B pipeline benchmark took 28 s
    with torch's default 2 threads and 23 s with 1, while the merge's arithmetic, overlapped with
    the transfers, never became the slowest part."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, available_cores() // 2)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


SCRATCH_PREFIX = "merge-bot-"
_SCRATCH_LOCK = ".in-use"


def claim_scratch(work_dir: Path | None) -> tuple[Path, int]:
    """A new scratch folder for one job in ``work_dir`` (default: the system's temp folder), and the
    descriptor of the lock it holds while the job runs (``release_scratch``).

    Scratch left by a job that died without cleaning up (kill -9, a lost machine: up to a few shards
    and pieces) is deleted first: its lock (``flock``) is free once no process holds it, whichever
    process, container or user made it, while a live job's folder is never touched."""
    import fcntl
    import os
    import shutil
    import tempfile

    root = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        lock = folder / _SCRATCH_LOCK
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue  # not ours to judge (no lock file: an older version's, or being made right now)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running job holds it
        finally:
            os.close(fd)
        log.info("removing scratch left by a job that stopped: %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root))
    fd = os.open(folder / f"{_SCRATCH_LOCK}.new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(folder / f"{_SCRATCH_LOCK}.new", folder / _SCRATCH_LOCK)  # visible only once held
    return folder, fd


def release_scratch(folder: Path, lock_fd: int) -> None:
    """Delete a job's scratch folder, then let go of its lock."""
    import os
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    os.close(lock_fd)


def check_scratch_space(work: Path, needed: int) -> None:
    from bot.preflight import check_free_space

    check_free_space(work, needed, what="the streamed merge's scratch files", hint="set --work-dir elsewhere")
