"""Fixtures for the AIFS-ENS 2.0 worker tests, run in the v2 worker environment (``.venv-v2``).

The tiny v2 checkpoint is the real anemoi-models 0.11 ensemble architecture (untrained), so it
only loads here; elsewhere this directory is ignored. Helpers and the emulator come from
tests/worker (worker_helpers.py), as the v1 tests use them.
"""

from __future__ import annotations

# pyproj MUST be imported before eccodes/earthkit (design.md): the other order crashes at exit
try:
    import pyproj  # noqa: F401
except ImportError:  # pragma: no cover - not a worker environment
    pyproj = None

import importlib.util
import os
import subprocess
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def _v2_environment() -> bool:
    try:
        if importlib.util.find_spec("torch_geometric") is None or importlib.util.find_spec("anemoi.inference") is None:
            return False
        return importlib_metadata.version("anemoi-models").startswith("0.11.")
    except (ImportError, importlib_metadata.PackageNotFoundError):
        return False


if not _v2_environment():  # pragma: no cover - the v1 or Airflow environment
    collect_ignore_glob = ["*"]
else:
    sys.path.insert(0, str(REPO / "tests" / "worker"))  # worker_helpers, shared with the v1 tests
    from worker_helpers import client, emulator  # noqa: F401  fixtures shared with the v1 tests


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.worker)


def v1_python() -> str:
    """The v1 worker environment's interpreter ($AIFS_WORKER_PYTHON, else the repository's .venv)."""
    return os.environ.get("AIFS_WORKER_PYTHON") or str(REPO / ".venv" / "bin" / "python")


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory) -> str:
    """The tiny AIFS-ENS 2.0 (real architecture, waves and snow cover) on the O48 grid."""
    from aifs.testing.tiny_model_v2 import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("ckpt-v2") / "tiny-v2.ckpt"), grid="O48")


@pytest.fixture(scope="session")
def v1_checkpoint(tmp_path_factory) -> str:
    """The tiny v1 model, made by the v1 environment (so it records anemoi-models 0.6)."""
    path = tmp_path_factory.mktemp("ckpt-v1") / "tiny-v1.ckpt"
    subprocess.run([v1_python(), "-m", "aifs.testing", "checkpoint", "--grid", "O48", "--out", str(path)],
                   check=True, timeout=300, stdout=subprocess.DEVNULL)
    return str(path)


@pytest.fixture
def bucket(client):
    import uuid

    return client.create_bucket(f"v2-{uuid.uuid4().hex[:12]}")
