"""A newcomer's first minutes, through the real entry point in child processes: install, help, names, messages."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from bot import errors
from hub_fixtures import ALICE

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("merge", "run", "push", "batch", "serve")


def bot(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bot", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, str]:
    cwd = tmp_path_factory.mktemp("help")
    out = {}
    for command in COMMANDS:
        proc = bot(command, "--help", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        out[command] = proc.stdout
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_examples_and_the_exit_code_table(helps, command):
    text = helps[command]
    examples = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert 1 <= len(examples) and all(f"python -m bot {command}" in line or "jobs" in line or line.startswith(" ")
                                      for line in examples)
    assert any(f"python -m bot {command} " in line for line in examples), examples
    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.MergeBotError)} | {0, 130}
    table = text.split("exit codes:", 1)[1]
    for code in codes:
        assert re.search(rf"(^|\s){code} \w", table), (code, table)


@pytest.mark.parametrize("command", ["merge", "run"])
def test_help_states_each_default(helps, command):
    flat = " ".join(helps[command].split())
    assert "--dtype DTYPE output dtype: auto, bfloat16, float16, float32; default: auto" in flat
    assert "where the arithmetic runs: auto, cpu, cuda; default: auto" in flat
    assert "default: auto, a sixteenth of the model between 128 MiB and 2 GiB" in flat


def test_serve_help_lists_its_environment(helps):
    from bot.service import config

    source = Path(config.__file__).read_text()
    named = set(re.findall(r'"((?:HF|MERGEBOT)_[A-Z_]+)"', source))
    assert {"HF_TOKEN", "MERGEBOT_WEBHOOK_SECRET", "MERGEBOT_REQUESTS_REPO"} <= named
    required = helps["serve"].split("environment (required):", 1)[1].split("environment (optional):", 1)[0]
    for name in ("HF_TOKEN", "MERGEBOT_WEBHOOK_SECRET", "MERGEBOT_REQUESTS_REPO"):
        assert name in required
    for name in named:
        assert re.search(rf"^\s+{name}\s", helps["serve"], re.MULTILINE), name


def test_batch_help_lists_every_job_key(helps):
    from bot.jobs import _BATCH_FIELDS

    keys = helps["batch"].split("job keys", 1)[1].split("exit codes:", 1)[0]
    listed = set(re.findall(r"^  ([a-z_]+)\s", keys, re.MULTILINE))
    assert listed == set(_BATCH_FIELDS)


@pytest.mark.parametrize("size, needle", [("5", "has no unit; write 5GB, 5MB or 5KB"),
                                          ("500B", "below the 1KB minimum"),
                                          ("5 bananas", "is not like 2GB")])
def test_shard_size_needs_a_unit(tmp_path, size, needle):
    (tmp_path / "adapter").mkdir()
    proc = bot("merge", "adapter", "--out", "out", "--max-shard-size", size, cwd=tmp_path)
    assert proc.returncode == errors.UsageError.exit_code
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_shard_size_units_that_are_kept():
    from bot.spec import parse_shard_size

    assert parse_shard_size("64KB") == 64_000 and parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("auto") is None and parse_shard_size("1.5GB") == 1_500_000_000


@pytest.mark.parametrize("env, why", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
                                      ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub could not be reached")])
def test_a_mistyped_folder_offline_is_quick_and_says_so(tmp_path, env, why):
    (tmp_path / "demo-adapter").mkdir()
    started = time.monotonic()
    proc = bot("merge", "demo-adaptr", "--out", "out", cwd=tmp_path, env=env)
    assert proc.returncode == errors.SourceNotFoundError.exit_code, proc.stderr
    assert proc.stderr.strip() == (f"Error: no folder ./demo-adaptr, and no Hub repo demo-adaptr was looked up "
                                   f"({why}); check the folder's path")
    assert "retrying" not in proc.stderr and "connection" not in proc.stderr
    assert time.monotonic() - started < 30  # no backoff: the retries alone would take 7 s


def test_a_bare_name_missing_everywhere_names_both(hub, models, tmp_path):
    proc = bot("merge", "demo-adaptr", "--out", "out", cwd=tmp_path)
    assert proc.returncode == errors.SourceNotFoundError.exit_code
    assert proc.stderr.startswith("Error: no folder ./demo-adaptr and no Hub repo demo-adaptr"), proc.stderr
    proc = bot("merge", "demo adaptr", "--out", "out", cwd=tmp_path)
    assert proc.returncode == errors.UsageError.exit_code
    assert proc.stderr.startswith("Error: no adapter folder ./demo adaptr, and 'demo adaptr' is not a Hub repo id")


# Pages of the Hub the client is pointed at (the loopback test server; HF_ENDPOINT is set by conftest),
# and of the default Hub (its address from huggingface_hub, parsed only: no request is made).
TEST_HUB = os.environ["HF_ENDPOINT"]
DEFAULT_HUB = constants._HF_DEFAULT_ENDPOINT


@pytest.mark.parametrize("typed", [
    f"{TEST_HUB}/alice/tiny-lora",
    f"{TEST_HUB}/alice/tiny-lora/tree/main",
    f"{TEST_HUB}/alice/tiny-lora/blob/main/adapter_config.json",
    f"{DEFAULT_HUB}/alice/tiny-lora",
    f"{DEFAULT_HUB}/alice/tiny-lora/tree/main",
    f"{DEFAULT_HUB}/alice/tiny-lora/blob/main/adapter_config.json",
    "hf.co/alice/tiny-lora",
    "alice/tiny-lora@main",
])
def test_pasted_names_are_normalised(typed):
    from bot.spec import SourceRef, parse_source_ref

    expected = SourceRef("alice/tiny-lora", "main" if typed.endswith(("main", "json")) else None)
    assert parse_source_ref(typed) == expected
    assert parse_source_ref(typed, allow_local=False) == expected


def test_a_pasted_url_merges(hub, models, tmp_path):
    proc = bot("merge", f"{TEST_HUB}/alice/tiny-lora/tree/main", "--out", "out", "--quiet", cwd=tmp_path,
               env={"HF_TOKEN": ALICE})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["adapter"]["repo_id"] == "alice/tiny-lora"


def test_quiet_silences_library_progress_bars(hub, models, tmp_path):
    env = {"HF_TOKEN": ALICE, "HF_HUB_DISABLE_PROGRESS_BARS": "", "TRANSFORMERS_VERBOSITY": ""}
    loud = bot("merge", "alice/tiny-lora", "--out", "loud", "--verify", cwd=tmp_path, env=env)
    assert loud.returncode == 0, loud.stderr
    assert "Fetching" in loud.stderr  # huggingface_hub's bar: what --quiet must silence
    quiet = bot("merge", "alice/tiny-lora", "--out", "quiet", "--verify", "--quiet", cwd=tmp_path, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    assert "verification passed:" in quiet.stdout


def test_preflight_sizes_are_human(hub, models, tmp_path):
    proc = bot("run", "alice/tiny-lora", "--repo", "alice/first-contact-run", "--verify", cwd=tmp_path,
               env={"HF_TOKEN": ALICE})
    assert proc.returncode == 0, proc.stderr
    preflight = next(line for line in proc.stderr.splitlines() if line.startswith("pre-flight:"))
    assert re.search(r"download ~\d+\.\d (KiB|MiB); output ~?\d+\.\d (KiB|MiB)|download ~\d+\.\d (KiB|MiB), "
                     r"output ~\d+\.\d (KiB|MiB)", preflight), preflight
    assert "0.00 GiB" not in proc.stderr
    # run --verify prints the numbers, as merge --verify does
    report = json.loads(hub.files("alice/first-contact-run")["merge_report.json"])
    delta = report["verification"]["end_to_end"]["max_abs_logit_delta"]
    assert "verification passed:" in proc.stdout, proc.stdout
    assert f"end to end max |delta logits| {delta:.3g}" in proc.stdout, proc.stdout


class SilentHub:
    """Accepts connections and never answers: a command waits on its first Hub read until Ctrl-C."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(120)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []

    def wait_for_a_client(self) -> None:
        conn, _ = self.sock.accept()
        self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.mark.parametrize("command, args, expected", [
    ("merge", ["alice/tiny-lora", "--out", "out"],
     "Error: interrupted; out was left as it was (the unfinished merge beside it was removed)"),
    ("run", ["alice/tiny-lora", "--repo", "alice/x"],
     "Error: interrupted; a publish is one final commit, so alice/x has all of it or none of it"),
    ("batch", ["jobs.yaml"],
     "Error: interrupted; finished jobs stay published, the job in progress committed nothing, the rest did not run"),
])
def test_ctrl_c_says_what_this_command_left(tmp_path, command, args, expected):
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - {adapter: alice/tiny-lora, repo: alice/x}\n")
    silent = SilentHub()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": silent.url, "HF_TOKEN": ALICE}
    proc = subprocess.Popen([sys.executable, "-m", "bot", command, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        silent.wait_for_a_client()
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        silent.close()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == expected, err
    assert "Traceback" not in err and "finished batch jobs" not in err


def test_pip_install_gives_a_merge_bot_command(tmp_path):
    """`pip install .` into a fresh venv (offline: no index, the system's setuptools), then `merge-bot` anywhere."""
    import shutil

    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bot", source / "bot", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # No pip of its own: ensurepip's bundled setuptools would shadow the system's newer one.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    env["PIP_NO_INDEX"] = "1"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-build-isolation", "--no-index", "-q", str(source)],
                               capture_output=True, text=True, env=env, timeout=600)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    helped = subprocess.run([str(venv / "bin" / "merge-bot"), "--help"], capture_output=True, text=True,
                            cwd=elsewhere, env=env)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: merge-bot") and "merge-bot merge" in helped.stdout
    for command in COMMANDS:
        assert command in helped.stdout.split("\n", 2)[1] or command in helped.stdout
    module = subprocess.run([str(python), "-m", "bot", "merge", "--help"], capture_output=True, text=True,
                            cwd=elsewhere, env=env)
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m bot merge"), module.stderr
    where = subprocess.run([str(python), "-c", "import bot; print(bot.__file__)"], capture_output=True, text=True,
                           cwd=elsewhere, env=env)
    assert str(venv) in where.stdout  # the installed copy, not the checkout
