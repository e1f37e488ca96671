"""pytest plugin: a session-wide local Hub server (see ``tests/hub_server.py``) and the environment to use it.

Load it from ``tests/conftest.py`` **before anything imports huggingface_hub / diffusers / svdiff_adapter**::

    pytest_plugins = ["tests.hub_fixtures"]

(or ``from tests.hub_fixtures import *`` at the very top of conftest.py; both work, and importing the module
twice under different names still starts only one server).

Why at import time
------------------
huggingface_hub 2.4.0 reads its environment once, when ``huggingface_hub.constants`` is imported:

* ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` come from ``HF_ENDPOINT``. Most code
  reads them from the module at call time (``hf_hub_download`` formats ``HUGGINGFACE_CO_URL_TEMPLATE``;
  ``HfApi(endpoint=None)`` copies ``constants.ENDPOINT`` in ``__init__``), **but** the module-level functions
  ``huggingface_hub.create_repo / upload_folder / model_info / ...`` (which diffusers' ``push_to_hub`` and
  ``from_pretrained`` call) are bound methods of ``huggingface_hub.hf_api.api = HfApi()``, created at import,
  so their endpoint is frozen then. ``utils._http._HUB_ORIGINS`` (auth forwarding on redirects) is frozen too.
* ``HF_HUB_OFFLINE`` -> ``constants.HF_HUB_OFFLINE``; diffusers copies it by value
  (``from huggingface_hub.constants import HF_HUB_OFFLINE`` in ``diffusers.utils.hub_utils`` and
  ``loaders.lora_base``), so it can only be changed before import (use a subprocess).
* ``HF_HOME`` / ``HF_HUB_CACHE`` -> ``constants.HF_HUB_CACHE`` (default ``cache_dir``), ``HF_TOKEN_PATH``.
* ``HF_HUB_DISABLE_XET`` -> ``constants.HF_HUB_DISABLE_XET``. hf_xet 1.8 is installed, so without it
  ``upload_folder`` / ``create_commit`` upload through the Xet protocol, which this server does not speak.
* ``HF_HUB_DISABLE_TELEMETRY`` also stops the user-agent code from fetching ``/api/agent-harnesses``.

So this module binds the server socket (port chosen by the OS, no race) and starts serving **when it is
imported**, then sets ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1`` and a throw-away
``HF_HOME`` in ``os.environ``, and removes ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` (a real token would be
sent to the local server, which answers unknown tokens with 401 like the Hub). ``HF_HUB_CACHE`` is left alone
if already set; tests should pass ``cache_dir=`` explicitly anyway. Subprocesses inherit this environment.

If huggingface_hub was already imported (conftest imported the package under test first), the module
falls back to :func:`retarget_huggingface_hub`, which patches the import-time copies listed above
(``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``hf_api.api.endpoint``,
``constants.HF_HUB_DISABLE_XET``/``HF_HUB_DISABLE_TELEMETRY``) and emits a warning. That works for
pull/push (tested), but it is a patch of private state; loading this plugin first is the clean way.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import uuid
import warnings
from typing import Any, Mapping

import pytest

try:  # imported as ``tests.hub_fixtures``
    from .hub_server import LocalHubServer
except ImportError:  # imported as a top-level module ``hub_fixtures`` (tests/ on sys.path)
    from hub_server import LocalHubServer  # type: ignore[no-redef]

__all__ = [
    "HUB_TOKEN",
    "HUB_USER",
    "OTHER_TOKEN",
    "OTHER_USER",
    "HUB_TOKENS",
    "get_session_hub",
    "hub_subprocess_env",
    "retarget_huggingface_hub",
    "run_python",
    "local_hub",
    "hub_token",
    "hub_api",
    "hub_env",
    "unique_repo_id",
]

HUB_USER = "user"
HUB_TOKEN = "hf_test_token"
OTHER_USER = "other"
OTHER_TOKEN = "hf_other_token"
HUB_TOKENS = {HUB_TOKEN: HUB_USER, OTHER_TOKEN: OTHER_USER}

_SINGLETON_KEY = "_svdiff_adapter_tests_session_hub"


def retarget_huggingface_hub(endpoint: str) -> None:
    """Point an ALREADY IMPORTED huggingface_hub at ``endpoint`` (fallback; prefer setting env before import)."""
    from huggingface_hub import constants  # noqa: PLC0415
    from huggingface_hub import hf_api  # noqa: PLC0415

    old_endpoint = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    if getattr(hf_api.api, "endpoint", None) == old_endpoint:
        hf_api.api.endpoint = endpoint
    package = sys.modules["huggingface_hub"]
    if "HUGGINGFACE_CO_URL_TEMPLATE" in package.__dict__:
        package.HUGGINGFACE_CO_URL_TEMPLATE = constants.HUGGINGFACE_CO_URL_TEMPLATE


def _start_session_hub() -> types.SimpleNamespace:
    workdir = tempfile.mkdtemp(prefix="svdiff-local-hub-")
    server = LocalHubServer(root=os.path.join(workdir, "store"), tokens=HUB_TOKENS).start()
    hf_home = os.path.join(workdir, "hf_home")
    os.makedirs(hf_home, exist_ok=True)
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": hf_home,
    }

    already_imported = "huggingface_hub.constants" in sys.modules
    os.environ.update(env)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        os.environ.pop(name, None)
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        warnings.warn(
            "HF_HUB_OFFLINE is set for the test process: tests that talk to the local Hub will fail.", stacklevel=2
        )
    if already_imported:
        warnings.warn(
            "tests.hub_fixtures was loaded after huggingface_hub was imported; patching huggingface_hub to use "
            f"{server.endpoint}. Load the plugin first in tests/conftest.py to avoid this.",
            stacklevel=2,
        )
        retarget_huggingface_hub(server.endpoint)

    def _cleanup() -> None:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(_cleanup)
    return types.SimpleNamespace(server=server, env=env, workdir=workdir, hf_home=hf_home, cleanup=_cleanup)


def get_session_hub() -> types.SimpleNamespace:
    """The process-wide hub state (``.server``, ``.env``, ``.workdir``, ``.hf_home``), started on first call."""
    holder = sys.modules.get(_SINGLETON_KEY)
    if holder is None:
        holder = types.ModuleType(_SINGLETON_KEY)
        holder.state = _start_session_hub()
        sys.modules[_SINGLETON_KEY] = holder
    return holder.state


# Start the server and fix the environment as soon as the plugin is imported (see module docstring).
_SESSION = get_session_hub()


def hub_subprocess_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` plus the hub settings plus ``extra`` (a ``None`` value removes the variable)."""
    env = dict(os.environ)
    env.update(get_session_hub().env)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(
    code: str, extra_env: Mapping[str, str | None] | None = None, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``code`` with ``sys.executable -c`` in the hub environment (+ ``extra_env``); returns the result.

    Use it whenever an environment variable must be set before huggingface_hub/diffusers are imported
    (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ...). With ``check=True`` a non-zero exit raises AssertionError
    showing stdout/stderr.
    """
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=hub_subprocess_env(extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed with exit code {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}"
        )
    return proc


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def local_hub() -> LocalHubServer:
    """The running :class:`LocalHubServer`; ``HF_ENDPOINT`` already points at ``local_hub.endpoint``."""
    server = get_session_hub().server
    assert server.running
    return server


@pytest.fixture(scope="session")
def hub_token() -> str:
    """A write token for the user ``HUB_USER`` (``"user"``)."""
    return HUB_TOKEN


@pytest.fixture(scope="session")
def hub_env(local_hub: LocalHubServer) -> dict[str, str]:
    """Environment for subprocesses that must talk to the local hub (copy; safe to modify)."""
    return hub_subprocess_env()


@pytest.fixture(scope="session")
def hub_api(local_hub: LocalHubServer) -> Any:
    """``huggingface_hub.HfApi`` bound to the local hub and authenticated as ``HUB_USER``."""
    from huggingface_hub import HfApi  # noqa: PLC0415 - import after the environment is set

    return HfApi(endpoint=local_hub.endpoint, token=HUB_TOKEN)


@pytest.fixture
def unique_repo_id(request: pytest.FixtureRequest) -> str:
    """A fresh ``user/<test-name>-<random>`` repo id (not created)."""
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:60] or "repo"
    return f"{HUB_USER}/{name}-{uuid.uuid4().hex[:8]}"
