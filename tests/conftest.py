import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hub_server import HubServer  # noqa: E402  (standard library only)

# Never reach the real Hub from a test: huggingface_hub reads these at import time, so
# the loopback test Hub is bound (port known) and the environment set before anything
# imports it. HF_HOME is a throwaway folder: no stored login, no shared cache.
HUB = HubServer()
_HF_HOME = tempfile.mkdtemp(prefix="merge-bot-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)
os.environ.update({
    "HF_ENDPOINT": HUB.url,
    "HF_HUB_DISABLE_XET": "1",
    "HF_HOME": _HF_HOME,
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
})
for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(name, None)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny bases and adapters built once per session, shared by tests."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The loopback test Hub, started once; tests use their own repo names."""
    HUB.start()
    yield HUB
    HUB.stop()


@pytest.fixture(scope="session")
def models(hub, cache_dir) -> dict:
    """Users alice (org lab), bob, carol, and bases/adapters on the test Hub (see hub_fixtures.py)."""
    from hub_fixtures import publish_models

    return publish_models(hub, cache_dir)


@pytest.fixture
def xet_hub(hub, tmp_path_factory, monkeypatch):
    """The session Hub speaking Xet, and this process's huggingface_hub with Xet on, for one test.

    The suite keeps HF_HUB_DISABLE_XET=1 (LFS) by default. huggingface_hub reads the flag from
    ``constants`` at call time (``is_xet_available``, ``shared_blobs_enabled``), so patching the
    constant (and the environment, for child processes) switches uploads and downloads to hf_xet.
    Its cache of Xet connection info (keyed by token URL) is cleared so that no CAS url of an
    earlier test is reused. The CAS folder outlives the test: files committed through it stay readable.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _xet

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0")
    _xet.XET_CONNECTION_INFO_CACHE.clear()
    hub.enable_xet(tmp_path_factory.mktemp("xet-cas"))
    try:
        yield hub
    finally:
        hub.disable_xet()
        _xet.XET_CONNECTION_INFO_CACHE.clear()
