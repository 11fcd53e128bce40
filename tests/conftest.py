import os
import sys
from pathlib import Path

# Never reach the real Hub from a test; quiet the libraries' progress bars.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("HF_TOKEN", None)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny bases and adapters built once per session, shared by tests."""
    return tmp_path_factory.mktemp("models")
