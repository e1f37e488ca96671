"""Test setup: no network, an isolated SVD cache, quiet warnings.

Environment variables that huggingface_hub/diffusers read at import time are set here, before any test module
imports them.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ["SVDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="svdiff-test-cache-")

# Starts the local Hub-compatible server and sets HF_* before huggingface_hub is imported anywhere.
from tests.hub_fixtures import *  # noqa: E402,F401,F403

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
# Tests use tiny matrices: one thread avoids OpenMP overhead (and spin-waits, ~80x slower on a busy machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Back to one thread after any test that changed it (trainers and benchmarks set their own)."""
    yield
    torch.set_num_threads(1)
