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
