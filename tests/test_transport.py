"""The Hub transport: one client per job, one retry loop, the card's links on the job's Hub.

The retry loop is tested with huggingface_hub's own error type around hand-made answers (no
server, no waiting: ``time.sleep`` is recorded instead); the one-client rule against the
loopback test Hub with the real client, counting every ``HfApi`` merge-bot builds.
"""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError

from bot import transport
from bot.errors import PublishError, RepoConflictError
from hub_fixtures import ALICE
from hub_fixtures import our_commits, run_cli

ROOT = Path(__file__).resolve().parents[1]


def hub_error(status: int, **headers: str) -> HfHubHTTPError:
    response = httpx.Response(status, headers=headers, request=httpx.Request("GET", "http://hub.test/api/x"))
    return HfHubHTTPError(f"HTTP {status}", response=response)


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(transport.time, "sleep", waits.append)
    return waits


def failing(*failures: BaseException, then: str = "done"):
    """A call that raises ``failures`` in turn, then returns ``then``; counts its calls."""
    left = list(failures)

    def call() -> str:
        call.calls += 1  # type: ignore[attr-defined]
        if left:
            raise left.pop(0)
        return then

    call.calls = 0  # type: ignore[attr-defined]
    return call


def test_transient_failures_are_retried_with_backoff_then_succeed(slept, caplog):
    call = failing(hub_error(503), ConnectionError("reset"))
    assert transport.retrying(call, waits=(1.0, 2.0, 4.0)) == "done"
    assert call.calls == 3 and slept == [1.0, 2.0]
    assert "transient Hub error on a read (503); retrying in 1.0s" in caplog.text
    assert "transient Hub error on a read (ConnectionError); retrying in 2.0s" in caplog.text


def test_a_permanent_failure_is_raised_at_once(slept):
    call = failing(hub_error(404))
    with pytest.raises(HfHubHTTPError):
        transport.retrying(call, waits=(1.0, 2.0))
    assert call.calls == 1 and slept == []


def test_the_last_transient_failure_is_raised_when_the_waits_run_out(slept):
    call = failing(hub_error(500), hub_error(502), hub_error(500))
    with pytest.raises(HfHubHTTPError) as raised:
        transport.retrying(call, waits=(1.0, 1.0))
    assert transport.http_status(raised.value) == 500 and call.calls == 3 and slept == [1.0, 1.0]


def test_a_merge_bot_error_is_an_answer_not_retried(slept):
    error = PublishError("refused")
    error.__cause__ = hub_error(503)  # even with a transient Hub failure behind it
    call = failing(error)
    with pytest.raises(PublishError):
        transport.retrying(call, waits=(1.0,))
    assert call.calls == 1


def test_a_rate_limit_waits_as_asked_within_the_window_and_gives_up_beyond_it(slept):
    call = failing(hub_error(429, RateLimit='"api";r=0;t=30'))
    assert transport.retrying(call, waits=(1.0,)) == "done"
    assert slept == [30.0]  # the Hub's ask, longer than the backoff

    call = failing(hub_error(429, RateLimit='"api";r=0;t=600'))  # past the 5-minute window: not worth waiting
    with pytest.raises(HfHubHTTPError):
        transport.retrying(call, waits=(1.0,))
    assert call.calls == 1 and slept == [30.0]

    # The cap counts every wait of one operation together.
    call = failing(*[hub_error(429, **{"Retry-After": "200"})] * 2)
    with pytest.raises(HfHubHTTPError):
        transport.retrying(call, waits=(1.0, 1.0))
    assert call.calls == 2 and slept == [30.0, 200.0]


def test_writes_also_retry_a_moved_target_and_end_in_one_line_errors(slept):
    call = failing(hub_error(412))
    assert transport.write_with_retries(call, doing="publishing to a/b", repo_id="a/b", waits=(1.0,)) == "done"
    assert call.calls == 2

    with pytest.raises(RepoConflictError, match=r"a/b changed or already exists while publishing to a/b \(HTTP 409\)"):
        transport.write_with_retries(failing(hub_error(409)), doing="publishing to a/b", repo_id="a/b", waits=(1.0,))
    with pytest.raises(PublishError, match=r"the Hub failed while publishing to a/b \(HTTP 503\).*retry later"):
        transport.write_with_retries(failing(*[hub_error(503)] * 2), doing="publishing to a/b", repo_id="a/b",
                                     waits=(1.0,))


def test_reads_use_the_read_waits(slept, monkeypatch):
    monkeypatch.setattr(transport, "READ_RETRY_WAITS", (0.5,))
    assert transport.read_with_retries(failing(hub_error(500))) == "done"
    assert slept == [0.5]
    with pytest.raises(HfHubHTTPError):  # a bare name is asked once: no waits
        transport.read_with_retries(failing(hub_error(500)), ())


def test_only_the_transport_module_builds_a_hub_client():
    sources = [path for folder in ("bot", "space") for path in sorted((ROOT / folder).rglob("*.py"))]
    builders = [p.relative_to(ROOT).as_posix() for p in sources if re.search(r"\bHfApi\(", p.read_text(encoding="utf-8"))]
    assert builders == ["bot/transport.py"]


@pytest.fixture
def clients_built(monkeypatch) -> list[dict]:
    """Every ``HfApi`` built through ``huggingface_hub.HfApi`` (as merge-bot builds it), with its arguments."""
    built: list[dict] = []

    class CountedHfApi(huggingface_hub.HfApi):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", CountedHfApi)
    return built


@pytest.mark.parametrize("pr", [False, True], ids=["new-repo", "pull-request"])
def test_a_whole_run_builds_one_hub_client(hub, models, capsys, clients_built, pr):
    """Token check, pre-flight, plan, downloads, uploads and the commit: one client for all, whether the
    merge is built whole (verified, small) or streamed Hub to Hub (--no-verify)."""
    repo = f"alice/one-client-{'pr' if pr else 'new'}"
    if pr:
        hub.create_repo(repo, owner_token=ALICE, files={"README.md": b"# alice's model\n"})
    code, _, err = run_cli(capsys, "run", "alice/tiny-lora", "--repo", repo, *(["--pr", "--no-verify"] if pr else []))
    assert code == 0, err
    assert len(clients_built) == 1, clients_built
    assert clients_built[0]["endpoint"] is None  # HF_ENDPOINT: the test server
    assert our_commits(hub, repo) or pr and hub.discussions(repo)


def test_the_card_links_to_the_jobs_hub():
    from dataclasses import replace

    from bot.card import build_card
    from bot.report import ReportSource
    from factory import unverified_report

    sha = "0123456789abcdef0123456789abcdef01234567"
    report = replace(unverified_report(adapter=ReportSource(ref="alice/lora", repo_id="alice/lora", revision=sha),
                                       base=ReportSource(ref="bob/base", repo_id="bob/base", revision=sha)),
                     requested_by="carol")
    card = build_card(report, None, None, hub_url="http://hub.test")
    assert f"[alice/lora](http://hub.test/alice/lora/tree/{sha})" in card
    assert f"[bob/base](http://hub.test/bob/base/tree/{sha})" in card
    assert "[@carol](http://hub.test/carol)" in card and "[@alice](http://hub.test/alice)" in card
