"""Exactly-once under load: the webhook served by a real uvicorn server, hit by many threads at once.

The Hub redelivers a webhook it thinks was lost, sometimes many times in a burst. The same
comment id 50 times at once must give one job and one acknowledgement; ordinary bursts of
different comments must still respect the per-user and queue caps.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from hub_fixtures import ALICE, BOB, CAROL
from test_service import (  # noqa: F401
    BOT,
    REQUESTS,
    SECRET,
    ask,
    bot_account,
    bot_comments,
    free_port,
)

from bot.service.config import ServiceConfig
from bot.service.webhook import create_app
from bot.service.worker import Service


@pytest.fixture
def served(hub, bot_account, tmp_path):  # noqa: F811
    """(service, url): the webhook app on a real HTTP server in this process, with uvicorn's own thread pool."""
    import uvicorn

    config = ServiceConfig(token=BOT, webhook_secret=SECRET, requests_repo=REQUESTS, db_path=tmp_path / "q.sqlite",
                           max_queued_per_user=2, max_queue=5)
    service = Service(config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield service, f"http://127.0.0.1:{port}/webhooks/merge"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def storm(url: str, bodies: list[dict]) -> list[tuple[int, str]]:
    """POST every body at the same moment (a barrier releases all threads together)."""
    barrier = threading.Barrier(len(bodies))

    def one(body: dict) -> tuple[int, str]:
        data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"X-Webhook-Secret": SECRET,
                                                                  "Content-Type": "application/json"})
        barrier.wait(timeout=20)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())["status"]

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_redelivery_storm_gives_one_job_and_one_acknowledgement(hub, served):
    service, url = served
    num, body = ask(hub, "alice", ALICE, "/merge alice/tiny-lora --dtype float16 --base bob/tiny-llama")
    started = time.perf_counter()
    answers = storm(url, [body] * 50)
    assert time.perf_counter() - started < 30
    statuses = Counter(status for _, status in answers)
    assert statuses == {"queued": 1, "ignored": 49}, statuses  # never "duplicate": it is the same comment
    assert {code for code, _ in answers} <= {200, 202}
    assert len(service.queue.jobs()) == 1
    service.triage_once()
    service.send_replies_once()
    replies = bot_comments(hub, num)
    assert len(replies) == 1 and replies[0].startswith("Accepted"), replies


def test_burst_of_distinct_comments_keeps_the_caps(hub, served):
    service, url = served
    bodies = []
    for who, token in (("alice", ALICE), ("bob", BOB), ("carol", CAROL)):
        for i in range(4):  # 4 different requests each; the cap is 2 per person and 5 in all
            bodies.append(ask(hub, who, token, f"/merge alice/tiny-lora --pr {who}/load-{i}")[1])
    answers = storm(url, bodies + bodies)  # and every one redelivered at once
    statuses = Counter(status for _, status in answers)
    assert statuses["queued"] == 5 and statuses["rejected"] == 7 and statuses["ignored"] == 12, statuses
    per_user = Counter(job.requester_id for job in service.queue.jobs())
    assert sum(per_user.values()) == 5 and max(per_user.values()) == 2
    service.send_replies_once()
    assert len([r for r in service.queue.pending_replies()]) == 0
