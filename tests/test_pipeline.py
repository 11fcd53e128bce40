"""Hub to Hub with bounded disk (bot.pipeline): base pieces streamed in, shards uploaded as they close.

Peak scratch disk is measured here, by polling the work folder from outside the code under
test; published tensors are compared bit for bit with a local merge of the same inputs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download

from bot import cli, pipeline
from bot.hub import UPLOADS_AT_ONCE

from factory import assert_matches_peft
from hub_fixtures import ALICE, publish_sharded_llama, tensor_bytes

ROOT = Path(__file__).resolve().parents[1]
SHARD = "64KB"  # output shards: many per model
PIECE = 32 * 1024


class DiskWatch:
    """Peak bytes held by files under ``folder``, sampled every millisecond in a thread."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for root, _, files in os.walk(self.folder):
                for name in files:
                    try:
                        total += os.stat(os.path.join(root, name)).st_size
                    except OSError:
                        pass
            self.peak = max(self.peak, total)
            time.sleep(0.001)

    def __enter__(self) -> "DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def sharded(hub, models, cache_dir):
    """A base in several shards on the test Hub, and a LoRA on every linear layer of it."""
    published = publish_sharded_llama(hub, cache_dir, "sharded", seed=99, layers=6,
                                      targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    assert len(list(published["base"].glob("*.safetensors"))) >= 3
    return published


def test_streamed_run_keeps_disk_to_a_few_pieces_and_publishes_what_a_local_merge_writes(
        hub, sharded, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PIECE_BYTES", PIECE)
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")  # no room to hold it whole: streamed, proved per shard
    work = tmp_path / "work"
    work.mkdir()
    cache = Path(os.environ["HF_HOME"])
    before = {p for p in cache.rglob("*.safetensors")}
    with DiskWatch(work) as disk:
        code = cli.main(["run", "alice/sharded-lora", "--repo", "alice/sharded-merged", "--max-shard-size", SHARD,
                         "--work-dir", str(work), "--token", ALICE])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "published alice/sharded-merged in one commit" in out
    report = json.loads(hub.files("alice/sharded-merged")["merge_report.json"])
    assert report["verification"]["proof"]["passed"] and report["verification"]["proof"]["modules_proved"] == 42
    assert report["verification"]["end_to_end"] is None and "streamed" in report["verification"]["end_to_end_skipped"]
    assert len([c for c in hub.commits("alice/sharded-merged") if c["title"].startswith("Merge ")]) == 1

    # Bounded: at most PREFETCH pieces, the shard being written and those uploading, and the small files;
    # less than half the model.
    bound = pipeline.PREFETCH * PIECE + (1 + UPLOADS_AT_ONCE) * 64_000 + 64 * 1024
    assert 0 < disk.peak <= bound, (disk.peak, bound)
    assert disk.peak < sharded["weights"] / 2, (disk.peak, sharded["weights"])
    assert not list(work.iterdir()), "scratch left behind"
    # The base's weights never went through the huggingface_hub cache.
    assert not [p for p in cache.rglob("*.safetensors") if p not in before and "sharded-llama" in str(p)]

    published = Path(snapshot_download("alice/sharded-merged", cache_dir=tmp_path / "dl"))
    assert len(list(published.glob("*.safetensors"))) >= 3
    local = tmp_path / "local"
    assert cli.main(["merge", str(sharded["adapter"]), "--base", str(sharded["base"]), "--out", str(local),
                     "--max-shard-size", SHARD]) == 0
    capsys.readouterr()
    assert tensor_bytes(published) == tensor_bytes(local)
    assert sorted(p.name for p in published.glob("*.safetensors")) == sorted(p.name for p in local.glob("*.safetensors"))
    assert_matches_peft(published, sharded["base"], sharded["adapter"])


def run_killed_at_commit(hub, repo: str) -> list[str]:
    """Start a streamed ``run`` into ``repo`` in a child process, SIGKILL it once it asks for the commit
    (the server holds that request), and return the command line for a rerun."""
    argv = [sys.executable, "-m", "bot", "run", "alice/sharded-lora", "--repo", repo, "--max-shard-size", SHARD]
    hub.delay_next("POST", rf"/api/models/{repo}/commit/.*", seconds=60)
    child = subprocess.Popen(argv, cwd=ROOT, env=streamed_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not any(m == "POST" and "/commit/" in p and repo in p for m, p in hub.requests_log):
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not [c for c in hub.commits(repo) if c["title"].startswith("Merge ")]
    return argv


def streamed_env() -> dict:  # noqa: N802 - reads like the constant it stands for
    """A child's environment: alice's token, and no room to verify end to end, so the merge streams."""
    return {**os.environ, "HF_TOKEN": ALICE, "MERGEBOT_VERIFY_MEMORY_GB": "0"}


def test_a_run_killed_before_its_commit_reuploads_nothing_on_restart(hub, sharded, tmp_path):
    start = hub.lfs_bytes_received
    argv = run_killed_at_commit(hub, "alice/killed-merged")
    assert hub.lfs_bytes_received - start > 0

    again = hub.lfs_bytes_received
    done = subprocess.run(argv, cwd=ROOT, env=streamed_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert hub.lfs_bytes_received - again == 0, "pre-uploaded shards were sent again"
    assert len([c for c in hub.commits("alice/killed-merged") if c["title"].startswith("Merge ")]) == 1
    assert ALICE not in done.stderr + done.stdout


def test_an_upload_that_keeps_failing_is_one_line_and_commits_nothing(hub, sharded, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")  # streamed: the shard upload is what fails
    hub.fail_next("PUT", r"/lfs-upload/.*", status=400, times=50)
    work = tmp_path / "work"
    work.mkdir()
    code = cli.main(["run", "alice/sharded-lora", "--repo", "alice/failing-merged", "--max-shard-size", SHARD,
                     "--work-dir", str(work), "--token", ALICE])
    _, err = capsys.readouterr()
    assert code == 9, err
    assert err.rstrip().splitlines()[-1].startswith("Error: ") and "Traceback" not in err
    assert "nothing was committed" in err
    assert not [c for c in hub.commits("alice/failing-merged") if c["title"].startswith("Merge ")]
    assert not list(work.iterdir()), "scratch left behind"
    hub.reset_faults()


def test_streamed_run_over_xet_and_a_killed_run_dedupes_on_restart(xet_hub, sharded, tmp_path):
    """The Hub's default transport: shards pre-uploaded through Xet, then one commit; a rerun after a
    kill adds (almost) nothing to the CAS."""
    hub = xet_hub
    cas_start = hub.cas_bytes()
    argv = run_killed_at_commit(hub, "alice/xet-streamed")
    assert hub.cas_bytes() - cas_start > 0
    assert not any(m == "POST" and "lfs/objects/batch" in p and "xet-streamed" in p for m, p in hub.requests_log)

    again = hub.cas_bytes()
    done = subprocess.run(argv, cwd=ROOT, env=streamed_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert hub.cas_bytes() - again < 64 * 1024, "pre-uploaded shards were sent again"
    assert len([c for c in hub.commits("alice/xet-streamed") if c["title"].startswith("Merge ")]) == 1
    published = Path(snapshot_download("alice/xet-streamed", cache_dir=tmp_path / "dl"))
    assert_matches_peft(published, sharded["base"], sharded["adapter"])


def test_a_base_the_hub_stops_serving_is_one_line_and_commits_nothing(hub, sharded, capsys, tmp_path, monkeypatch):
    """Range reads of the base that keep failing (here while reading its headers): exit 13, no commit."""
    import bot.transport

    monkeypatch.setattr(bot.transport, "READ_RETRY_WAITS", (0.01, 0.01))
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")
    hub.fail_next("GET", r"/bob/sharded-llama/resolve/.*\.safetensors", status=503, times=100)
    try:
        code = cli.main(["run", "alice/sharded-lora", "--repo", "alice/dropped-merged", "--max-shard-size", SHARD,
                         "--work-dir", str(tmp_path), "--token", ALICE])
    finally:
        hub.reset_faults()
    _, err = capsys.readouterr()
    assert code == 13, err
    assert err.rstrip().splitlines()[-1].startswith("Error: ") and "Traceback" not in err
    assert not hub.repo_exists("alice/dropped-merged") or not [
        c for c in hub.commits("alice/dropped-merged") if c["title"].startswith("Merge ")]


@pytest.mark.parametrize("variant", ["cdn_redirect", "lfs_upload_elsewhere", "no_file_metadata", "gzip_text"])
def test_streamed_run_on_another_hub_compatible_server(variant, hub, sharded, capsys, tmp_path, monkeypatch):
    """Range reads through a CDN redirect that refuses the token, uploads to another origin, listings
    without sizes, gzip on text: the streamed path publishes what a local merge writes."""
    monkeypatch.setattr(pipeline, "PIECE_BYTES", PIECE)
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")
    repo = f"alice/streamed-{variant.replace('_', '-')}"
    hub.variant = {variant}
    cdn_before = len(hub.cdn_log)
    try:
        code = cli.main(["run", "alice/sharded-lora", "--repo", repo, "--max-shard-size", SHARD,
                         "--work-dir", str(tmp_path), "--token", ALICE])
    finally:
        hub.variant = set()
    _, err = capsys.readouterr()
    assert code == 0, err
    if variant == "cdn_redirect":
        assert any(m == "GET" and p.startswith("/cdn-lfs/") for m, p in hub.cdn_log[cdn_before:]), \
            "the base was not read via the CDN"
    published = Path(snapshot_download(repo, cache_dir=tmp_path / "dl"))
    assert_matches_peft(published, sharded["base"], sharded["adapter"])


def test_split_range_gives_contiguous_parts_of_at_least_the_minimum():
    from bot.remote import split_range

    for start, end, streams, part_min in [(0, 100, 4, 10), (7, 1000, 4, 100), (5, 9, 4, 100), (0, 64, 4, 16),
                                          (3, 4, 8, 1), (0, 2**31 + 5, 4, 2**20)]:
        parts = split_range(start, end, streams, part_min)
        assert parts[0][0] == start and parts[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])), parts
        assert 1 <= len(parts) <= streams
        assert len(parts) == 1 or all(e - s >= part_min for s, e in parts[:-1]), parts


def test_pieces_come_in_parallel_parts_and_a_dropped_part_alone_is_fetched_again(
        hub, sharded, capsys, tmp_path, monkeypatch):
    """Each piece is split into range requests run at once; a connection dropped mid-part retries that
    part only, and what is published is still what a local merge writes."""
    import bot.remote
    import bot.transport

    monkeypatch.setattr(pipeline, "PIECE_BYTES", PIECE)
    monkeypatch.setattr(bot.remote, "RANGE_PART_MIN", PIECE // 4)
    monkeypatch.setattr(bot.transport, "READ_RETRY_WAITS", (0.01, 0.01))
    monkeypatch.setenv("MERGEBOT_VERIFY_MEMORY_GB", "0")
    calls: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    lock = threading.Lock()
    real_get = bot.remote._get

    def get(remote, name, start, end, write):
        with lock:
            calls.append((start, end))
            drop = end is not None and start > 0 and end - start <= PIECE // 4 + 1 and not dropped
            if drop:
                dropped.append((start, end))
        if drop:  # half the part arrives, then the connection goes
            real_get(remote, name, start, start + (end - start) // 2, write)
            raise ConnectionError("connection reset by peer")
        return real_get(remote, name, start, end, write)

    monkeypatch.setattr(bot.remote, "_get", get)
    code = cli.main(["run", "alice/sharded-lora", "--repo", "alice/parted-merged", "--max-shard-size", SHARD,
                     "--work-dir", str(tmp_path), "--token", ALICE])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert len(dropped) == 1 and calls.count(dropped[0]) == 2, "the dropped part was not fetched again, alone"
    parts = [(s, e) for s, e in calls if e is not None and e - s <= PIECE // 4 + 1]
    assert len(parts) > len(list(sharded["base"].glob("*.safetensors"))) * 4, "pieces were not split into parts"
    published = Path(snapshot_download("alice/parted-merged", cache_dir=tmp_path / "dl"))
    local = tmp_path / "local"
    assert cli.main(["merge", str(sharded["adapter"]), "--base", str(sharded["base"]), "--out", str(local),
                     "--max-shard-size", SHARD]) == 0
    capsys.readouterr()
    assert tensor_bytes(published) == tensor_bytes(local)


def test_scratch_a_killed_run_left_is_removed_by_the_next_run_and_a_live_one_is_not(tmp_path):
    import fcntl

    from bot.pipeline import claim_scratch, release_scratch

    dead, dead_fd = claim_scratch(tmp_path)
    (dead / "piece-00001").write_bytes(b"x" * 1000)
    os.close(dead_fd)  # as the kernel does for a process killed with kill -9
    live, live_fd = claim_scratch(tmp_path)
    held = tmp_path / "merge-bot-held"  # another process's job, lock held
    held.mkdir()
    (held / ".in-use").write_bytes(b"")
    other_fd = os.open(held / ".in-use", os.O_RDWR)
    fcntl.flock(other_fd, fcntl.LOCK_EX)
    unlocked = tmp_path / "merge-bot-space-x"  # a folder without a lock file is not ours to judge
    unlocked.mkdir()

    new, new_fd = claim_scratch(tmp_path)
    assert not dead.exists()
    assert live.exists() and held.exists() and unlocked.exists() and new.exists()
    release_scratch(new, new_fd)
    release_scratch(live, live_fd)
    os.close(other_fd)
    assert not new.exists() and not live.exists()


def test_the_streamed_merge_uses_half_the_cores_a_container_grants_and_restores_torchs_setting(monkeypatch):
    """A 2-vCPU quota on a 64-core host (a Space): one merge thread, not 32; torch's setting comes back
    even when the merge fails."""
    import pathlib

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    files = {"/sys/fs/cgroup/cpu.max": "200000 100000\n"}
    real_read = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self).startswith("/sys/fs/cgroup"):
            if str(self) not in files:
                raise FileNotFoundError(str(self))
            return files[str(self)]
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    assert pipeline.available_cores() == 2
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert pipeline.available_cores() == 64
    del files["/sys/fs/cgroup/cpu.max"]
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "350000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"})
    assert pipeline.available_cores() == 4

    before = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with pytest.raises(RuntimeError):
            with pipeline.merge_threads_beside_transfers():
                assert torch.get_num_threads() == 2  # half of the 4 cores the v1 quota grants
                raise RuntimeError("the merge failed")
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(before)


def test_a_short_disk_write_is_finished_not_left_as_zeros(tmp_path, monkeypatch):
    from bot.remote import write_fully

    real = os.pwrite
    calls = []

    def half_pwrite(fd, data, at):  # a nearly full disk takes part of a write
        calls.append(len(data))
        return real(fd, bytes(data)[: max(1, len(data) // 2)], at)

    monkeypatch.setattr(os, "pwrite", half_pwrite)
    path = tmp_path / "piece"
    with open(path, "wb") as fh:
        fh.truncate(1000)
        write_fully(fh.fileno(), b"x" * 600, 100)
    assert path.read_bytes() == b"\0" * 100 + b"x" * 600 + b"\0" * 300
    assert len(calls) > 1


def test_a_fetcher_closed_mid_download_stops_its_parts_marks_nothing_ready_and_closes_its_files(
        tmp_path, monkeypatch):
    """What the merge is handed is only ever a piece whose every part arrived; a stop halts running parts at
    their next chunk and leaves no file open (a failed job must not keep downloading or leak descriptors)."""
    import gc
    import warnings

    import bot.remote
    from bot.plan import TensorJob
    from bot.remote import RemoteWeights
    from bot.shards import TensorInfo

    monkeypatch.setattr(bot.remote, "RANGE_PART_MIN", 1024)
    started, release = threading.Event(), threading.Event()

    def slow_get(remote, name, start, end, write):  # one chunk, then the link stalls until released
        write(b"\1" * 16)
        started.set()
        release.wait(10)
        write(b"\1" * (end - start - 16))

    monkeypatch.setattr(bot.remote, "_get", slow_get)
    jobs = [TensorJob(f"t{i}", TensorInfo(f"t{i}", "U8", (4096,), Path("model.safetensors"), 4096 * i, 4096 * (i + 1)),
                      None, (), "U8", (4096,)) for i in range(4)]
    remote = RemoteWeights("bob/base", "0" * 40, "http://127.0.0.1:1", ("model.safetensors",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # an unclosed piece file fails the test
        fetcher = pipeline.PieceFetcher(remote, jobs, tmp_path, piece_bytes=8192, prefetch=2)
        assert started.wait(10)
        closer = threading.Thread(target=fetcher.close)
        closer.start()
        time.sleep(0.3)
        release.set()  # the stalled parts get their next chunk and see the stop
        closer.join(10)
        fetcher._thread.join(10)
        gc.collect()
    assert not fetcher._thread.is_alive()
    assert not any(piece.ready.is_set() or piece.path for piece in fetcher.pieces), \
        "a piece whose parts were stopped was handed out as fetched"


def test_a_passthrough_copy_across_file_systems_survives_short_writes(tmp_path, monkeypatch):
    """copy_file_range refused (EXDEV) and a nearly full disk taking half of each write: the copied
    tensor is still whole, byte for byte."""
    import errno

    from safetensors.torch import load_file, save_file

    from bot.shards import OutputTensor, ShardWriter, read_header

    source = tmp_path / "base.safetensors"
    value = torch.arange(300_000, dtype=torch.float32).reshape(600, 500)
    save_file({"w": value}, str(source))
    info = read_header(source)[0]["w"]

    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    real_write = os.write

    def half_write(fd, data):
        return real_write(fd, bytes(data)[: max(1, len(data) // 2)])

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "write", half_write)
    writer = ShardWriter(tmp_path / "out.safetensors", [OutputTensor("w", info.dtype, info.shape)])
    writer.copy_raw("w", info)
    writer.close()
    monkeypatch.undo()
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["w"], value)
