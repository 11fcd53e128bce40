"""Progress of a job, phase by phase: one small interface every front end consumes.

A job reports three phases, each in bytes so that a speed and an ETA mean something:

- ``download``: base bytes fetched from the Hub (``bot.pipeline.PieceFetcher``; a streamed job only);
- ``merge``: bytes of output tensors written (``bot.merge.stream_merge``'s per-tensor callback);
- ``upload``: bytes pre-uploaded to the target (``bot.hub.Publication``, one call per file).

The CLI draws a tqdm bar per phase, the Space feeds ``gr.Progress``, the self-service worker
shows the phase in its queue table. Calls come from the fetch, merge and upload threads at
once, as often as every chunk: a sink must be thread-safe and throttle what it shows itself.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Protocol

DOWNLOAD, MERGE, UPLOAD = "download", "merge", "upload"
PHASES = (DOWNLOAD, MERGE, UPLOAD)


class ProgressSink(Protocol):
    def phase(self, name: str, done: int, total: int) -> None:
        """``done`` of ``total`` bytes of phase ``name`` (one of ``PHASES``) are through; never decreases
        within a job."""


class PhaseCounter:
    """Adds byte counts from any thread to one phase's running total and reports it to a sink."""

    def __init__(self, sink: ProgressSink, name: str, total: int):
        self.sink, self.name, self.total, self.done = sink, name, total, 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:  # one lock per phase: the sink sees this phase's counts in order
            self.done += n
            self.total = max(self.total, self.done)  # an estimate's total (file headers) never shows over 100%
            self.sink.phase(self.name, self.done, self.total)

    def finish(self) -> None:
        """The phase is over: what was done is the total (the planned total was an estimate)."""
        with self._lock:
            self.total = self.done
            self.sink.phase(self.name, self.done, self.total)

    def describe(self) -> str:
        """``1.2 GiB/2.7 GiB at 40.1 MiB/s, ETA 38s``: the phase so far, for event lines."""
        from bot.pipeline import human_bytes

        with self._lock:
            done, total = self.done, self.total
        speed = done / max(time.monotonic() - self.started, 1e-6)
        eta = (total - done) / speed if speed > 0 and total > done else 0.0
        return f"{human_bytes(done)}/{human_bytes(total)} at {human_bytes(speed)}/s, ETA {eta:.0f}s"


def merge_progress(sink: ProgressSink, output_bytes: Iterable[tuple[str, int]]) -> Callable[[int, int, str], None]:
    """A ``bot.merge`` per-tensor callback ``(done, total, name)`` that reports output bytes written
    (``output_bytes``: each tensor's name and size) as the ``merge`` phase."""
    sizes = dict(output_bytes)
    counter = PhaseCounter(sink, MERGE, sum(sizes.values()))

    def on_tensor(done: int, total: int, name: str) -> None:
        counter.add(sizes.get(name, 0))

    return on_tensor


def phase_line(name: str, done: int, total: int, seconds: float) -> str:
    """``merge 45% (1.2 GiB/2.7 GiB) at 40.1 MiB/s, ETA 38s`` for status lines and tables."""
    from bot.pipeline import human_bytes

    share = f"{100 * done // total}%" if total > 0 else "0%"
    speed = done / seconds if seconds > 0 else 0.0
    eta = f", ETA {format_seconds((total - done) / speed)}" if speed > 0 and total > done else ""
    return f"{name} {share} ({human_bytes(done)}/{human_bytes(total)}) at {human_bytes(speed)}/s{eta}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PhaseSummary:
    """A sink that keeps one line per phase and hands ``show`` all of them as one text (``download 100%
    ...; merge 45% ... ETA 38s; upload 30% ...``), at most once per ``every`` seconds, and when a phase
    starts or ends: a status that stays current without an update per chunk."""

    def __init__(self, show: Callable[[str], None], *, every: float = 15.0, clock=time.monotonic):
        self.show, self.every, self.clock = show, every, clock
        self.lines: dict[str, str] = {}
        self._started: dict[str, float] = {}
        self._shown_at = float("-inf")
        self._lock = threading.Lock()

    def phase(self, name: str, done: int, total: int) -> None:
        with self._lock:
            now = self.clock()
            first = name not in self._started
            started = self._started.setdefault(name, now)
            self.lines[name] = phase_line(name, done, total, now - started)
            if not (first or done >= total or now - self._shown_at >= self.every):
                return
            self._shown_at = now
            text = "; ".join(self.lines[n] for n in PHASES if n in self.lines)
            self.show(text)  # under the lock: texts arrive in the order they were made


class NoProgress:
    """The sink of a job nobody watches."""

    def phase(self, name: str, done: int, total: int) -> None:
        pass
