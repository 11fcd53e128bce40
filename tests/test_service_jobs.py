"""The self-service bot with MERGEBOT_EXECUTOR=jobs: each merge runs as a Hugging Face Job.

The test Hub's Jobs API (``enable_jobs``) runs every Job as a real ``python -m bot run``
subprocess, with the Job's secrets as its environment, so these tests exercise the whole path:
request, Job, commit, reply; failures, timeouts, cancellation, no credits, the concurrency cap,
and a kill -9 of the bot while its Job runs.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hub_fixtures import ALICE, CAROL
from hub_server import disable_jobs, enable_jobs
from huggingface_hub import HfApi
from test_service import (  # noqa: F401
    BOT,
    REQUESTS,
    ROOT,
    SECRET,
    ask,
    bot_account,
    bot_comments,
    free_port,
    post,
)

from bot.executors import JobsSettings, choose_flavor, job_command
from bot.jobs import PublishJob
from bot.service.config import ServiceConfig
from bot.service.webhook import create_app
from bot.service.worker import Service

IMAGE = "hf.co/spaces/merge-bot/merge-bot"


@pytest.fixture
def jobs(hub, bot_account):  # noqa: F811
    api = enable_jobs(hub, root=ROOT)
    yield api
    disable_jobs(hub)


def make_service(tmp_path: Path, **settings) -> Service:
    config = ServiceConfig(token=BOT, webhook_secret=SECRET, requests_repo=REQUESTS, db_path=tmp_path / "q.sqlite",
                           executor="jobs", jobs=JobsSettings(image=IMAGE, poll_s=0.0, **settings))
    return Service(config)


def run_until(service: Service, done, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        service.triage_once()
        service.work_once()
        service.send_replies_once()
        if done():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def jobs_lora(hub, models):
    """An adapter only this module merges, so targets made by other modules' tests do not interfere."""
    from hub_fixtures import adapter_files

    hub.create_repo("alice/jobs-lora", owner_token=ALICE, files=adapter_files(models["adapter"], "bob/tiny-llama"))
    return "alice/jobs-lora"


def test_request_runs_as_a_job_and_is_answered_like_a_local_run(hub, jobs, tmp_path, jobs_lora):
    service = make_service(tmp_path)
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/jobs-lora --dtype bfloat16 --base bob/tiny-llama")
    num2, body2 = ask(hub, "carol", CAROL, "/merge alice/jobs-lora --dtype bfloat16 --base bob/tiny-llama")
    assert post(client, body).json()["status"] == "queued"
    assert post(client, body2).json()["status"] == "duplicate"
    run_until(service, lambda: any(c.startswith("Done:") for c in bot_comments(hub, num2)))
    target = "merge-bot/alice-jobs-lora-merged-bfloat16"
    replies = bot_comments(hub, num)
    assert replies[0].startswith("Accepted") and replies[-1].startswith(f"Done: {hub.url}/{target}")
    assert f"(published {target} in one commit.)" in replies[-1]
    assert len(jobs.created) == 1
    job = jobs.jobs[jobs.created[0]]
    assert BOT not in json.dumps(job.spec["command"]) and job.spec["secrets"] == {"HF_TOKEN": BOT}
    assert "--verify" in job.spec["command"] and job.spec["flavor"] == "cpu-basic"
    assert all(BOT not in line for _, line in job.logs)
    assert len([c for c in hub.commits(target) if c["title"].startswith("Merge ")]) == 1
    report = json.loads(hub.files(target)["merge_report.json"])
    assert report["requested_by"] == "alice" and report["verification"]
    entry = service.queue.jobs()[0]
    assert entry.state == "done" and entry.remote_job["id"] == job.id


def test_failed_job_gets_its_error_line_and_no_token(hub, jobs, tmp_path):
    service = make_service(tmp_path)
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float16 --base bob/tiny-llama --pr alice/jobs-fail")
    hub.create_repo("alice/jobs-fail", owner_token=ALICE, files={"README.md": b"# x\n"})
    hub.fail_next("POST", r"/api/models/alice/jobs-fail/commit/", 403, times=5)
    post(TestClient(create_app(service)), body)
    run_until(service, lambda: any("failed" in c for c in bot_comments(hub, num)))
    reply = bot_comments(hub, num)[-1]
    assert reply.startswith("The merge failed: `") and BOT not in reply and "\n" not in reply.split("<!--")[0].strip()
    assert service.queue.jobs()[0].state == "failed"


def test_timeout_cancel_and_no_credits_get_one_line_replies(hub, jobs, tmp_path):
    service = make_service(tmp_path, timeout_s=1)
    client = TestClient(create_app(service))
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float32 --base bob/tiny-llama")
    post(client, body)
    run_until(service, lambda: any("failed" in c for c in bot_comments(hub, num)))
    assert "ran past its 1-second limit" in bot_comments(hub, num)[-1]

    service = make_service(tmp_path / "b", timeout_s=600)
    client = TestClient(create_app(service))
    num, body = ask(hub, "carol", CAROL, "/merge alice/tiny-lora --dtype float32 --base bob/tiny-llama")
    post(client, body)
    run_until(service, lambda: service.queue.jobs()[0].remote is not None)
    HfApi(token=BOT).cancel_job(job_id=service.queue.jobs()[0].remote_job["id"], namespace="merge-bot")
    run_until(service, lambda: any("failed" in c for c in bot_comments(hub, num)))
    assert "was cancelled" in bot_comments(hub, num)[-1]

    jobs.no_credits = True
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float32 --base bob/tiny-llama")
    post(client, body)
    run_until(service, lambda: any("failed" in c for c in bot_comments(hub, num)))
    assert "no credits left to run a Job (HTTP 402)" in bot_comments(hub, num)[-1]
    assert {j.state for j in service.queue.jobs()} == {"failed"}
    assert not [c for c in hub.commits("merge-bot/alice-tiny-lora-merged-float32") if c["title"].startswith("Merge ")] \
        if hub.repo_exists("merge-bot/alice-tiny-lora-merged-float32") else True


def test_concurrency_cap_and_a_lost_job_id_is_found_not_duplicated(hub, jobs, tmp_path):
    service = make_service(tmp_path, max_concurrent=1)
    client = TestClient(create_app(service))
    nums = []
    for who, token, target in (("alice", ALICE, "alice/cap-1"), ("carol", CAROL, "carol/cap-2")):
        num, body = ask(hub, who, token, f"/merge alice/tiny-lora --base bob/tiny-llama --pr {target}")
        hub.create_repo(target, owner_token=token, files={"README.md": b"# x\n"})
        post(client, body)
        nums.append(num)
    service.triage_once()
    # A crash after starting the Job but before storing its id: the restart finds it by its labels.
    claimed = service.queue.claim_next()
    publish, _, flavor = service._remote_plan(claimed)
    service.remote.launch(publish, flavor=flavor, labels={"merge-bot-queue": service.queue.identity,
                                                          "merge-bot-entry": str(claimed.id), "merge-bot-attempt": "1"})
    peak = 0

    def both_done() -> bool:
        nonlocal peak
        peak = max(peak, sum(j.stage == "RUNNING" for j in jobs.jobs.values()))
        return all(any(c.startswith("Done:") for c in bot_comments(hub, n)) for n in nums)

    run_until(service, both_done, timeout=90)
    assert len(jobs.created) == 2 and peak == 1


def test_flavor_and_command():
    assert choose_flavor(output_bytes=int(14e9), download_bytes=int(15e9), verify=True) == "cpu-basic"
    assert choose_flavor(output_bytes=int(14e9), download_bytes=int(30e9), verify=True) == "cpu-xl"
    assert choose_flavor(output_bytes=int(140e9), download_bytes=int(140e9), verify=False) == "cpu-upgrade"
    assert choose_flavor(output_bytes=int(20e9), download_bytes=int(20e9), verify=False) == "cpu-basic"
    job = PublishJob(adapter="a/b@" + "1" * 40, base="c/d@" + "2" * 40, repo="e/f", pr=True, verify=True)
    assert job_command(job) == ["python", "-m", "bot", "run", "a/b@" + "1" * 40, "--repo", "e/f", "--base",
                                "c/d@" + "2" * 40, "--pr", "--verify"]
    # run verifies by default, so a job that asks for none must say so on the Job's command line
    unverified = job_command(PublishJob(adapter="a/b@" + "1" * 40, base="c/d@" + "2" * 40, repo="e/f", verify=False))
    assert unverified[-1] == "--no-verify" and "--verify" not in unverified
    from bot.cli import build_parser

    assert build_parser().parse_args(unverified[3:]).verify is False


def test_sigkill_while_a_job_runs_then_restart_reattaches_exactly_once(hub, jobs, tmp_path, jobs_lora):
    from test_service import wait_for

    target = "merge-bot/alice-jobs-lora-merged-float16"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": BOT, "MERGEBOT_WEBHOOK_SECRET": SECRET,
           "MERGEBOT_REQUESTS_REPO": REQUESTS, "MERGEBOT_DB": str(tmp_path / "queue.sqlite"),
           "MERGEBOT_EXECUTOR": "jobs", "MERGEBOT_JOBS_IMAGE": IMAGE, "MERGEBOT_JOBS_POLL_S": "0.3"}

    def serve() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "bot", "serve", "--port", str(port)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _healthy(port), timeout=60)
        return proc

    proc = serve()
    num, body = ask(hub, "alice", ALICE, "/merge alice/jobs-lora --dtype float16 --base bob/tiny-llama")
    hub.delay_next("POST", rf"/api/models/{target}/commit/", 3.0)  # the Job outlives the bot
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/merge", data=json.dumps(body).encode(),
                                     headers={"X-Webhook-Secret": SECRET, "Content-Type": "application/json"})
    assert json.loads(urllib.request.urlopen(request, timeout=5).read())["status"] == "queued"
    db = sqlite3.connect(tmp_path / "queue.sqlite")
    wait_for(lambda: db.execute("SELECT remote FROM jobs WHERE remote IS NOT NULL").fetchone())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert jobs.jobs[jobs.created[0]].stage in ("SCHEDULING", "RUNNING")
    wait_for(lambda: jobs.jobs[jobs.created[0]].stage == "COMPLETED")  # it finished while no bot was there
    proc = serve()
    try:
        wait_for(lambda: any(c.startswith("Done:") for c in bot_comments(hub, num)))
        time.sleep(1.5)  # room for a wrong second Job, commit or reply
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert len(jobs.created) == 1
    assert len([c for c in hub.commits(target) if c["title"].startswith("Merge ")]) == 1
    replies = bot_comments(hub, num)
    assert sum(c.startswith("Done:") for c in replies) == 1 and sum(c.startswith("Accepted") for c in replies) == 1
    assert db.execute("SELECT state, attempts FROM jobs").fetchall() == [("done", 1)]


def _healthy(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        return True
    except OSError:
        return False


def test_batch_with_the_jobs_executor(hub, jobs, tmp_path):
    batch = tmp_path / "batch.yaml"
    batch.write_text("jobs:\n"
                     "  - {adapter: alice/tiny-lora, base: bob/tiny-llama, repo: alice/batch-jobs-1, dtype: float16}\n"
                     "  - {adapter: alice/tiny-lora, base: bob/tiny-llama, repo: alice/batch-jobs-2, verify: true}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": ALICE, "MERGEBOT_JOBS_IMAGE": IMAGE,
           "MERGEBOT_JOBS_POLL_S": "0.3", "MERGEBOT_JOBS_MAX_CONCURRENT": "1"}
    proc = subprocess.run([sys.executable, "-m", "bot", "batch", str(batch), "--executor", "jobs"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "created" in proc.stdout and f"{hub.url}/alice/batch-jobs-1" in proc.stdout
    assert f"{hub.url}/alice/batch-jobs-2" in proc.stdout and ALICE not in proc.stdout + proc.stderr
    assert len(jobs.created) == 2 and all(j.spec["secrets"] == {"HF_TOKEN": ALICE} for j in jobs.jobs.values())
    assert json.loads(hub.files("alice/batch-jobs-2")["merge_report.json"])["verification"]
    again = subprocess.run([sys.executable, "-m", "bot", "batch", str(batch), "--executor", "jobs"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and again.stdout.count("unchanged") == 2 and len(jobs.created) == 2
