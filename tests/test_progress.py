"""Progress per phase (bot.progress) and ZeroGPU's short GPU calls (space/zerogpu.py).

A recording sink watches a streamed run against the test Hub: download, merge and upload each
climb, never back, to their totals. The CLI draws its bars only for a person at a terminal. On
ZeroGPU, a fake ``spaces`` module (its GPU decorator runs on the CPU and records each call) shows
that only the arithmetic crosses over, each call within its duration limit, and that a used-up
quota moves the rest of the job to the CPU with the same tensors.
"""
from __future__ import annotations

import importlib
import pickle
import re
import sys
import threading
import time
import types
from pathlib import Path

import gradio as gr
import pytest
from huggingface_hub import HfApi, snapshot_download

from bot import cli, pipeline
from bot.jobs import PublishJob, run_publish_job
from bot.transport import hub_client
from bot.progress import DOWNLOAD, MERGE, PHASES, UPLOAD, PhaseSummary, phase_line
from hub_fixtures import ALICE, publish_sharded_llama, tensor_bytes
from space import zerogpu

SHARD = "64KB"
PIECE = 32 * 1024


class RecordingSink:
    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()

    def phase(self, name: str, done: int, total: int) -> None:
        with self._lock:
            self.calls.append((name, done, total))

    def of(self, name: str) -> list[tuple[int, int]]:
        return [(done, total) for n, done, total in self.calls if n == name]


@pytest.fixture(scope="module")
def sharded(hub, models, cache_dir):
    """A base in several shards on the test Hub and a LoRA on its linear layers (names of this module's own)."""
    return publish_sharded_llama(hub, cache_dir, "progress", seed=7, layers=4, targets=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def streamed(monkeypatch):
    """Small pieces (many range requests) and no room to verify end to end: the Hub-to-Hub path."""
    monkeypatch.setattr(pipeline, "PIECE_BYTES", PIECE)
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")


def assert_phase_complete(sink: RecordingSink, name: str) -> None:
    calls = sink.of(name)
    assert calls, f"no {name} phase"
    dones = [done for done, _ in calls]
    assert dones == sorted(dones), f"{name} went backwards"
    assert all(0 <= done <= total for done, total in calls), calls
    assert calls[-1][0] == calls[-1][1] > 0, calls[-1]


def test_a_streamed_run_reports_download_merge_and_upload_to_their_totals(hub, sharded, streamed, tmp_path):
    sink, events = RecordingSink(), []
    job = PublishJob(adapter="alice/progress-lora", repo="alice/progress-phases", max_shard_size=SHARD)
    result = run_publish_job(job, api=hub_client(token=ALICE), work_dir=tmp_path, on_event=events.append, progress=sink)
    assert result.publish.action == "created"
    for name in PHASES:
        assert_phase_complete(sink, name)
    assert len(sink.of(DOWNLOAD)) > 3 and len(sink.of(MERGE)) > 3 and len(sink.of(UPLOAD)) >= 3
    # The events keep their one line per uploaded shard.
    assert len([e for e in events if e.startswith("uploaded ")]) >= 3


def test_cli_draws_phase_bars_on_a_terminal_only(hub, sharded, streamed, tmp_path, capsys, monkeypatch):
    drawn: list[tuple[str, int, int]] = []
    real = cli._PhaseBars.phase

    def spy(self, name, done, total):
        drawn.append((name, done, total))
        real(self, name, done, total)

    monkeypatch.setattr(cli._PhaseBars, "phase", spy)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["run", "alice/progress-lora", "--max-shard-size", SHARD, "--work-dir", str(tmp_path), "--token", ALICE]
    assert cli.main([*argv, "--repo", "alice/progress-tty"]) == 0
    _, err = capsys.readouterr()
    for name in PHASES:
        done, total = [(d, t) for n, d, t in drawn if n == name][-1]
        assert done == total > 0, name
        assert re.search(rf"{name}\s*:\s*\d+%\|", err), err  # drawn as a bar
    assert "B/s" in err and not re.search(r"^uploaded ", err, re.M)  # the upload bar replaces the per-shard lines

    drawn.clear()
    assert cli.main([*argv, "--repo", "alice/progress-quiet", "--quiet"]) == 0
    _, err = capsys.readouterr()
    assert not drawn and "%|" not in err and "B/s" not in err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # a log file: one line per event, no bars
    assert cli.main([*argv, "--repo", "alice/progress-log"]) == 0
    _, err = capsys.readouterr()
    assert not drawn and "%|" not in err
    assert len([line for line in err.splitlines() if line.startswith("uploaded ")]) >= 3


def test_phase_summary_updates_at_most_every_so_often():
    now = [0.0]
    shown: list[str] = []
    summary = PhaseSummary(shown.append, every=10, clock=lambda: now[0])
    summary.phase(DOWNLOAD, 0, 100)  # a phase starts: shown
    for step in range(1, 100):
        now[0] = step * 0.11  # eleven seconds of updates, nine a second
        summary.phase(DOWNLOAD, step, 100)
    assert len(shown) == 2  # the start, then once ten seconds on
    summary.phase(MERGE, 0, 50)
    summary.phase(DOWNLOAD, 100, 100)  # a phase ends: shown
    assert len(shown) == 4
    assert shown[-1].startswith("download 100% (100 B/100 B)") and "; merge 0%" in shown[-1]
    assert phase_line(MERGE, 25, 100, 10.0) == "merge 25% (25 B/100 B) at 2 B/s, ETA 30s"
    assert "ETA 1m00s" in phase_line(UPLOAD, 50, 100, 60.0)


def test_the_queue_table_shows_a_running_jobs_phases(tmp_path):
    from bot.service.commands import MergeRequest
    from bot.service.queue import JobQueue, Where

    queue = JobQueue(tmp_path / "jobs.sqlite")
    job, _ = queue.enqueue(MergeRequest("alice/x"), requester_id="u1", comment_id=None,
                           where=Where("model", "me/requests", 1))
    queue.accept(job.id, requester="alice", target="bot/x-merged", adapter_sha="a" * 40, target_private=False,
                 reply="ok")
    assert queue.claim_next().id == job.id
    summary = PhaseSummary(lambda text: queue.set_progress(job.id, text), every=10)
    summary.phase(MERGE, 10, 40)
    row = queue.status_rows()[0]
    assert row[1] == "running" and row[-1].startswith("merge 25% (10 B/40 B)")
    queue.finish(job.id, state="done", url="http://x", reply=None, reply_kind="done")
    assert queue.status_rows()[0][-1] == ""


# ---- ZeroGPU ---------------------------------------------------------------------------------------------------


class FakeSpaces(types.ModuleType):
    """``spaces`` as far as merge-bot uses it: ``GPU(duration=...)``. Calls run here, on the CPU, with their
    arguments and results pickled as ZeroGPU's worker process needs, and are recorded (requested seconds,
    thread, time window); after ``quota_calls`` calls it refuses as spaces does."""

    def __init__(self, quota_calls: int | None = None):
        super().__init__("spaces")
        self.quota_calls = quota_calls
        self.calls: list[dict] = []
        self.refused = 0
        self._inside = threading.local()

    def inside(self) -> bool:
        return getattr(self._inside, "active", False)

    def GPU(self, fn=None, *, duration=60):  # noqa: N802 - spaces' own name
        def decorate(func):
            def call(*args, **kwargs):
                if self.quota_calls is not None and len(self.calls) >= self.quota_calls:
                    self.refused += 1
                    raise gr.Error("You have exceeded your free ZeroGPU quota (60s requested vs. 5s left). "
                                   "Try again in 20:00:00.", title="ZeroGPU quota exceeded")
                seconds = duration(*args, **kwargs) if callable(duration) else duration
                record = {"seconds": seconds, "thread": threading.get_ident(), "start": time.monotonic()}
                self._inside.active = True
                try:  # ZeroGPU runs the call in another process: arguments and results cross by pickle
                    args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
                    return pickle.loads(pickle.dumps(func(*args, **kwargs)))
                finally:
                    self._inside.active = False
                    record["end"] = time.monotonic()
                    self.calls.append(record)
            return call
        return decorate if fn is None else decorate(fn)


@pytest.fixture
def fake_spaces(monkeypatch):
    """Install a FakeSpaces and re-import space.zerogpu under it (its GPU function is decorated at import);
    the "GPU" is the CPU. Returns a function that sets the quota."""
    made: list[FakeSpaces] = []

    def install(quota_calls: int | None = None) -> FakeSpaces:
        fake = FakeSpaces(quota_calls)
        sys.modules["spaces"] = fake
        importlib.reload(zerogpu)
        monkeypatch.setattr(zerogpu, "GPU_DEVICE", "cpu")
        made.append(fake)
        return fake

    yield install
    sys.modules.pop("spaces", None)
    importlib.reload(zerogpu)


@pytest.fixture
def io_watch(monkeypatch):
    """Every base download, upload and wait for a piece, with whether it ran inside a (fake) GPU call."""
    from bot import remote

    seen: list[tuple[str, bool]] = []

    def watch(what, real):
        def run(*args, **kwargs):
            spaces = sys.modules.get("spaces")
            seen.append((what, bool(spaces is not None and spaces.inside())))
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(remote, "fetch_part", watch("download", remote.fetch_part))
    monkeypatch.setattr(HfApi, "preupload_lfs_files", watch("upload", HfApi.preupload_lfs_files))
    monkeypatch.setattr(pipeline.PieceFetcher, "localize", watch("wait", pipeline.PieceFetcher.localize))
    return seen


def local_merge(sharded, tmp_path: Path, capsys) -> dict[str, bytes]:
    out = tmp_path / "local"
    assert cli.main(["merge", str(sharded["adapter"]), "--base", str(sharded["base"]), "--out", str(out),
                     "--max-shard-size", SHARD]) == 0
    capsys.readouterr()
    return tensor_bytes(out)


@pytest.mark.parametrize("quota_calls", [None, 2])
def test_zerogpu_holds_the_gpu_only_for_the_arithmetic(hub, sharded, streamed, fake_spaces, io_watch, tmp_path,
                                                       capsys, quota_calls):
    fake = fake_spaces(quota_calls)
    seen = io_watch
    events: list[str] = []
    compute = zerogpu.ZeroGpuCompute(events.append)
    repo = f"alice/progress-zerogpu-{quota_calls or 'all'}"
    job = PublishJob(adapter="alice/progress-lora", repo=repo, max_shard_size=SHARD)
    result = run_publish_job(job, api=hub_client(token=ALICE), work_dir=tmp_path, on_event=events.append,
                             compute=compute)
    assert result.publish.action == "created"
    assert result.report.verification.proof.passed

    # Downloads, uploads and waits for pieces all happened, none inside a GPU call; the calls were short.
    assert {what for what, _ in seen} == {"download", "upload", "wait"}
    assert not [what for what, inside in seen if inside]
    assert fake.calls and all(zerogpu.DEFAULT_GPU_SECONDS <= c["seconds"] <= zerogpu.MAX_GPU_SECONDS
                              for c in fake.calls)
    fallback = [e for e in events if "merging the rest on the CPU" in e]
    if quota_calls is None:
        assert not fallback and fake.refused == 0 and compute.fallback is None
        assert len(fake.calls) >= 3  # one call per shard's batch, at least
    else:
        assert len(fake.calls) == quota_calls and fake.refused == 1  # never asked again once refused
        assert fallback == ["ZeroGPU quota used up; merging the rest on the CPU"]

    published = Path(snapshot_download(repo, cache_dir=tmp_path / "dl"))
    assert tensor_bytes(published) == local_merge(sharded, tmp_path, capsys)


def test_zerogpu_durations_stay_within_the_limit():
    from bot.merge import COMPUTE_BATCH_BYTES

    class Batch:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    assert zerogpu.gpu_seconds(Batch(1)) == zerogpu.gpu_seconds(Batch(COMPUTE_BATCH_BYTES)) == 60
    assert 60 < zerogpu.gpu_seconds(Batch(2 * COMPUTE_BATCH_BYTES)) <= 300
    assert zerogpu.gpu_seconds(Batch(100 * COMPUTE_BATCH_BYTES)) == 300


def test_zerogpu_refusals_are_told_apart_from_the_merges_own_errors():
    from bot.errors import AdapterConfigError

    assert zerogpu.gpu_refusal(gr.Error("x", title="ZeroGPU quota exceeded")) == "ZeroGPU quota used up"
    assert zerogpu.gpu_refusal(gr.Error("No GPU was available", title="ZeroGPU client error")) == \
        "ZeroGPU unavailable (client error)"
    assert zerogpu.gpu_refusal(AdapterConfigError("merging x gave NaN")) is None
    assert zerogpu.gpu_refusal(gr.Error("something else")) is None

    def broken(batch):
        raise AdapterConfigError("merging x gave NaN")

    with pytest.raises(AdapterConfigError):  # the merge's own failure stops the job, on any device
        zerogpu.ZeroGpuCompute(lambda _: None, gpu_call=broken)(None)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole-folder"])
def test_the_space_on_zerogpu_says_when_it_fell_back_to_the_cpu(hub, models, fake_spaces, monkeypatch, streamed):
    from space import handlers

    fake_spaces(0)  # the visitor's quota is gone before the first call
    monkeypatch.setenv("SPACE_ID", "merge-bot/merge-bot")
    monkeypatch.setenv("HF_TOKEN", "not-this-one")
    if streamed:  # else the tiny model is built whole and checked end to end: the compute hook serves both paths
        monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")
    descs: list[str] = []
    oauth = gr.OAuthToken(token=ALICE, scope="openid profile write-repos", expires_at=0)
    profile = gr.OAuthProfile({"preferred_username": "alice", "name": "alice", "profile": "", "picture": ""})
    repo = f"alice/progress-space-cpu-{'streamed' if streamed else 'whole'}"
    result, _, _, _ = handlers.merge_and_publish("alice/tiny-lora", "", repo, False, False, "auto", True, False,
                                                 profile, oauth,
                                                 progress=lambda value=None, desc=None, **_: descs.append(desc))
    assert repo in result
    assert "Note: ZeroGPU quota used up; the rest of the merge ran on the CPU." in result
    assert "ZeroGPU quota used up; merging the rest on the CPU" in descs
