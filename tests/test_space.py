"""The Gradio Space: handlers called with OAuth objects, and the running app through gradio_client.

The browser test (headless Chromium) lives in test_space_browser.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import gradio as gr
import pytest

from hub_fixtures import ALICE, CAROL
from space import handlers


def profile(name: str) -> gr.OAuthProfile:
    return gr.OAuthProfile({"preferred_username": name, "name": name, "profile": f"http://127.0.0.1/{name}",
                            "picture": ""})


def token(value: str) -> gr.OAuthToken:
    return gr.OAuthToken(token=value, scope="openid profile read-repos write-repos manage-repos", expires_at=0)


def no_progress(*args, **kwargs) -> None:
    return None


@pytest.fixture
def on_a_space(monkeypatch):
    """Behave as on a Space: only the OAuth token counts, never HF_TOKEN."""
    monkeypatch.setenv("SPACE_ID", "merge-bot/merge-bot")
    monkeypatch.setenv("HF_TOKEN", CAROL)


def test_preflight_view_shows_plan_and_suggests_a_repo(hub, models, on_a_space):
    text, repo = handlers.preflight_view("alice/tiny-lora", "", "auto", "", None, profile("alice"), token(ALICE))
    adapter_sha = hub.commits("alice/tiny-lora")[0]["id"][:12]
    base_sha = hub.commits("bob/tiny-llama")[0]["id"][:12]
    assert "Ready to merge" in text and "LORA" in text
    assert f"`alice/tiny-lora` at `{adapter_sha}`" in text and f"`bob/tiny-llama` at `{base_sha}`" in text
    assert repo == "alice/tiny-lora-merged"


@pytest.mark.parametrize("adapter, user, expected", [
    ("alice/prompt-tuning", ALICE, "PROMPT_TUNING"),
    ("alice/lora-on-gated", CAROL, "bob/gated-llama is gated"),
    ("alice/qlora-bare", ALICE, "in Base model override"),
    ("alice/nothing-here", ALICE, "not found"),
])
def test_preflight_view_explains_refusals_at_once(hub, models, on_a_space, adapter, user, expected):
    text, _ = handlers.preflight_view(adapter, "", "auto", "", None, None, token(user))
    assert text.startswith("**Will be refused:**") and expected in text
    assert user not in text and "--" not in text  # the form's words, not command-line flags


def test_merge_and_publish_with_the_users_oauth_token(hub, models, on_a_space):
    result, panel, rendered, card = handlers.merge_and_publish("alice/tiny-lora", "", "", False, False, "auto", True,
                                                               None, profile("alice"), token(ALICE),
                                                               progress=no_progress)
    assert "alice/tiny-lora-merged" in result and "**Verification passed**" in result
    assert "end to end max |delta logits|" in result
    assert panel.startswith("**Done:**") and "LORA adapter alice/tiny-lora@" in panel
    assert "base_model: bob/tiny-llama" not in rendered.split("<details>")[0]  # the header is not prose
    assert "base_model: bob/tiny-llama" in card and 'repo = "alice/tiny-lora-merged"' in card
    commits = [c for c in hub.commits("alice/tiny-lora-merged") if c["title"].startswith("Merge ")]
    assert len(commits) == 1
    report = json.loads(hub.files("alice/tiny-lora-merged")["merge_report.json"])
    assert report["verification"]["end_to_end"]["max_abs_logit_delta"] < 1e-4


class Recorder:
    """Stands in for gr.Progress and keeps every update."""

    def __init__(self):
        self.calls = []

    def __call__(self, value=None, desc=None, unit=None, **kwargs):
        self.calls.append((value, desc))


def test_space_streams_with_real_progress(hub, models, on_a_space):
    progress = Recorder()
    result, _, _, _ = handlers.merge_and_publish("alice/tiny-lora", "", "alice/space-streamed", False, False, "auto",
                                                 False, False, profile("alice"), token(ALICE), progress=progress)
    assert "alice/space-streamed" in result
    descs = [d for _, d in progress.calls if d]
    assert any(d.startswith("pre-flight done; download ~") and "iB, output ~" in d for d in descs), descs
    phases = [(v, d) for v, d in progress.calls if isinstance(v, float)]
    assert phases and phases[-1][0] == 1.0  # the bar follows the merge, to the real total
    merges = [d for _, d in phases if "merge " in d]
    assert merges and all(re.search(r"merge \d+% \([\d.]+ \w?i?B/[\d.]+ \w?i?B\) at .+/s", d) for d in merges)
    final = phases[-1][1]
    assert "merge 100%" in final and "upload 100%" in final, final
    assert not [d for d in descs if "0/0 B" in d or "incomplete" in d]


def test_target_follows_the_adapter_until_edited(hub, models, on_a_space):
    you, key = profile("alice"), token(ALICE)
    _, repo = handlers.preflight_view("alice/med-lroa", "", "auto", "", True, you, key)
    assert repo == "alice/med-lroa-merged"
    _, repo = handlers.preflight_view("alice/tiny-lora", "", "auto", repo, True, you, key)
    assert repo == "alice/tiny-lora-merged"
    _, repo = handlers.preflight_view("alice/tiny-lora", "", "auto", "alice/mine", False, you, key)
    assert repo == "alice/mine"
    assert "public** repo `alice/mine`" in handlers.target_view("alice/mine", False, False)
    assert "pull request** on the existing repo `alice/mine`" in handlers.target_view("alice/mine", True, True)


@pytest.mark.parametrize("typed", [f"{os.environ['HF_ENDPOINT']}/alice/tiny-lora", "hf.co/alice/tiny-lora/tree/main",
                                   f"{os.environ['HF_ENDPOINT']}/alice/tiny-lora/blob/main/adapter_config.json"])
def test_the_form_takes_pasted_addresses(hub, models, on_a_space, typed):
    text, repo = handlers.preflight_view(typed, "", "auto", "", False, profile("alice"), token(ALICE))
    assert "Ready to merge" in text and "`alice/tiny-lora` at" in text, text
    assert repo == "alice/tiny-lora-merged"


def test_verdict_in_words():
    from bot.report import ProofSummary, Verification

    proof = ProofSummary(method="per-module proof", peft_version="0.21.2", modules_proved=4, saved_copies=0,
                         unchanged_tensors=17, probes_per_module=8, max_error_ulp=0.5, threshold_ulp=1.0,
                         max_share_beyond_half_ulp=0.0, threshold_share=0.01, max_dense_relative_delta=0.0,
                         worst_module=None, passed=True)
    passed = handlers.verification_verdict(Verification(proof=proof, end_to_end=None, passed=True))
    failed = handlers.verification_verdict(Verification(proof=proof, end_to_end=None, passed=False))
    assert passed.startswith("**Verification passed** (threshold 1 ulp per element") and "4 modules proved" in passed
    assert failed.startswith("**Verification failed**")


def test_space_never_falls_back_to_a_shared_token(hub, models, on_a_space):
    with pytest.raises(gr.Error, match="Sign in with Hugging Face first"):
        handlers.merge_and_publish("alice/tiny-lora", "", "carol/should-not-exist", False, False, "auto", False,
                                   False, None, None, progress=no_progress)
    assert not hub.repo_exists("carol/should-not-exist")


def test_errors_are_one_line_gr_errors_without_the_token(hub, models, on_a_space):
    with pytest.raises(gr.Error) as caught:
        handlers.merge_and_publish("alice/tiny-lora", "", "bob/not-yours", False, False, "auto", False,
                                   False, profile("alice"), token(ALICE), progress=no_progress)
    message = caught.value.message
    assert "cannot write to namespace bob" in message and "\n" not in message and ALICE not in message


def test_anonymous_preflight_on_a_space_does_not_use_the_spaces_token(hub, models, on_a_space):
    # HF_TOKEN (the Space's own secret) is carol's here; an anonymous visitor must not read as carol.
    hub.create_repo("carol/private-lora", owner_token=CAROL, private=True,
                    files={"adapter_config.json": b'{"peft_type": "LORA", "base_model_name_or_path": "bob/tiny-llama"}'})
    text, _ = handlers.preflight_view("carol/private-lora", "", "auto", "", None, None, None)
    assert text.startswith("**Will be refused:**") and "not found" in text


def test_server_folders_are_never_inputs_of_the_form(hub, models, on_a_space):
    local = str(models["base"])  # e.g. a gated model's snapshot folder in the Space's shared cache
    text, _ = handlers.preflight_view("alice/tiny-lora", local, "auto", "", None, profile("alice"), token(ALICE))
    assert text.startswith("**Will be refused:**") and "local path" in text
    with pytest.raises(gr.Error, match="local path"):
        handlers.merge_and_publish(str(models["adapter"]), "", "alice/from-a-folder", False, False, "auto", False,
                                   False, profile("alice"), token(ALICE), progress=no_progress)
    assert not hub.repo_exists("alice/from-a-folder")


def test_local_mode_uses_hf_token_and_ignores_the_mock(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert handlers.user_token(token("mock-oauth-token-for-local-dev")) == ALICE
    assert handlers.user_token(None) == ALICE
    monkeypatch.setenv("SPACE_ID", "x/y")
    assert handlers.user_token(None) is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_app(hub, models):
    """space/app.py launched on 127.0.0.1 in local mode (token from HF_TOKEN, Hub from HF_ENDPOINT)."""
    saved = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = ALICE
    os.environ.pop("SPACE_ID", None)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from space.app import build_app

    demo = build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    if saved is None:
        os.environ.pop("HF_TOKEN", None)
    else:
        os.environ["HF_TOKEN"] = saved


def test_gradio_client_runs_a_full_merge(hub, running_app):
    from gradio_client import Client

    client = Client(running_app, verbose=False)
    preflight, repo = client.predict("alice/tiny-lora", "", "auto", "", api_name="/preflight")
    assert "Ready to merge" in preflight and repo == "alice/tiny-lora-merged"
    result, _, _, card = client.predict("alice/tiny-lora", "", "alice/from-gradio-client", False, False, "bfloat16",
                                        False, api_name="/merge")
    assert f"{hub.url}/alice/from-gradio-client" in result  # an API call's target is taken as given
    assert "library_name: transformers" in card
    assert json.loads(hub.files("alice/from-gradio-client")["merge_report.json"])["output_dtype"] == "bfloat16"


ARTIFACTS = Path(os.environ.get("MERGEBOT_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def chromium_path() -> str:
    """Debian's chromium (installed by scripts/install_chromium.sh), or MERGEBOT_CHROMIUM."""
    for candidate in (os.environ.get("MERGEBOT_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate:
            return candidate
    pytest.fail("no Chromium found: run `bash scripts/install_chromium.sh` (installs Debian's chromium) or set MERGEBOT_CHROMIUM")


@pytest.fixture(scope="module")
def page(running_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def enter_adapter(page, url: str, adapter: str) -> None:
    page.goto(url)
    box = page.locator("#adapter textarea, #adapter input").first
    box.fill(adapter)
    box.press("Enter")


RECORD_PROGRESS = """() => {
    window.__progress = [];
    const seen = new Set();
    const grab = () => {
        for (const el of document.querySelectorAll('.progress-text, .progress-level, .meta-text, .meta-text-center')) {
            const text = el.textContent.trim();
            if (text && !seen.has(text)) { seen.add(text); window.__progress.push(text); }
        }
    };
    new MutationObserver(grab).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_browser_preflight_merge_and_link(hub, running_app, page, monkeypatch):
    from playwright.sync_api import expect

    real_phase = handlers.ProgressReport.phase

    def slow_phase(self, name, done, total):  # a tiny model merges in a blink; let the page see each step
        real_phase(self, name, done, total)
        if name == "merge":
            time.sleep(0.15)

    monkeypatch.setattr(handlers.ProgressReport, "phase", slow_phase)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    repo_box = page.locator("#repo textarea, #repo input").first
    # A typo first: the target follows the adapter, and follows the correction.
    enter_adapter(page, running_app, "alice/med-lroa")
    expect(page.locator("#preflight")).to_contain_text("Will be refused")
    expect(repo_box).to_have_value("alice/med-lroa-merged")
    adapter_box = page.locator("#adapter textarea, #adapter input").first
    adapter_box.fill(f"{hub.url}/alice/tiny-lora/tree/main")  # pasted from the browser
    adapter_box.press("Enter")
    expect(page.locator("#preflight")).to_contain_text("Ready to merge")
    expect(page.locator("#preflight")).to_contain_text("bob/tiny-llama")
    expect(page.locator("#preflight")).to_contain_text("KiB")  # human units, never ~0.00 GiB
    expect(repo_box).to_have_value("alice/tiny-lora-merged")
    expect(page.locator("#target")).to_contain_text("Will create the public repo alice/tiny-lora-merged")
    # Once typed by the user, the target is theirs.
    repo_box.click()  # leaving the adapter box starts one more pre-flight; its answer keeps following until we type
    expect(repo_box).to_have_value("alice/tiny-lora-merged")
    repo_box.press("Control+a")
    repo_box.press_sequentially("alice/from-browser")  # typed, as a person does (fill() is no keyboard input)
    adapter_box.fill("alice/tiny-lora")
    adapter_box.press("Enter")
    expect(page.locator("#preflight")).to_contain_text("Ready to merge")
    expect(repo_box).to_have_value("alice/from-browser")
    expect(page.locator("#target")).to_contain_text("Will create the public repo alice/from-browser")
    page.evaluate(RECORD_PROGRESS)
    page.locator("#merge").click()
    link = page.locator("#result a")
    expect(link).to_have_attribute("href", f"{hub.url}/alice/from-browser", timeout=120_000)
    expect(page.locator("#result")).to_contain_text("Verification passed")
    expect(page.locator("#result")).to_contain_text("threshold 1 ulp")
    expect(page.locator("#preflight")).to_contain_text("Done:")
    expect(page.locator("#preflight")).not_to_contain_text("Enter an adapter id")
    # The card rendered as Markdown (a heading, no YAML fence in the prose); its source one tab away.
    expect(page.locator("#card h1, #card h2").first).to_be_visible()
    assert "library_name:" not in page.locator("#card").inner_text().split("Card metadata")[0]
    page.screenshot(path=str(ARTIFACTS / "space-merge.png"), full_page=True)
    page.get_by_role("tab", name="Card source").click()
    expect(page.locator("#card-source")).to_contain_text("library_name: transformers")
    seen = page.evaluate("window.__progress")
    merging = [t for t in seen if "merge " in t and "/s" in t]
    assert merging and all("iB" in t for t in merging) and any("ETA" in t for t in merging), seen
    assert not [t for t in seen if "0/0 B" in t or "incomplete" in t.lower()], seen  # huggingface_hub's bars
    assert hub.repo_exists("alice/from-browser")


def test_browser_refusal_is_a_clear_message(hub, running_app, page):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    enter_adapter(page, running_app, "alice/prompt-tuning")
    expect(page.locator("#preflight")).to_contain_text("Will be refused")
    expect(page.locator("#preflight")).to_contain_text("PROMPT_TUNING")
    page.locator("#repo textarea, #repo input").first.fill("alice/never-created")
    page.locator("#merge").click()
    toast = page.locator(".toast-body").filter(has_text="cannot be merged")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("PROMPT_TUNING")
    page.screenshot(path=str(ARTIFACTS / "space-refusal.png"))  # viewport: the error toast is fixed-position
    assert "Traceback" not in page.content()
    assert not hub.repo_exists("alice/never-created")
