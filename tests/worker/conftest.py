"""Fixtures for the worker tests: a real GCS emulator, a tiny real checkpoint, synthetic inputs.

Runs only in the worker environment (torch, anemoi-inference, earthkit); elsewhere (the Airflow
environment) this directory is ignored rather than failing at import.
"""

from __future__ import annotations

# pyproj MUST be imported before eccodes/earthkit: two bundled libproj copies segfault at
# interpreter exit the other way round (design.md), turning a passing run into exit 134.
try:
    import pyproj  # noqa: F401
except ImportError:  # pragma: no cover - not the worker environment
    pyproj = None

import importlib.util
import logging
import uuid
from pathlib import Path

import pytest


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


if not all(_has(m) for m in ("torch", "anemoi.inference", "earthkit.data", "google.cloud.storage")):  # pragma: no cover
    collect_ignore_glob = ["*"]

from worker_helpers import Dirs, Spec, client, emulator, kept_root_logging  # noqa: E402,F401  (client, emulator: fixtures)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.worker)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    """A tiny AIFS-ENS stand-in on the O48 grid that the real anemoi-inference runner loads."""
    from aifs.testing.tiny_model import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"), grid="O48")


@pytest.fixture(scope="session")
def slow_checkpoint(tmp_path_factory) -> str:
    """Same model, but every step takes >= 0.15 s: gives an outage test time to act mid-member."""
    from aifs.testing.tiny_model import build_checkpoint

    return build_checkpoint(str(tmp_path_factory.mktemp("ckpt-slow") / "slow.ckpt"), grid="O48", step_seconds=0.15)


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory) -> str:
    """The tiny real-architecture AIFS-ENS 2.0 model (waves, snow, 10 hPa), made by the v2 environment."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    v2_python = os.environ.get("AIFS_WORKER_PYTHON_V2") or str(root / ".venv-v2" / "bin" / "python")
    path = tmp_path_factory.mktemp("ckpt-v2") / "tiny-v2.ckpt"
    subprocess.run([v2_python, "-m", "aifs.testing", "checkpoint", "--arch", "v2", "--grid", "O48", "--out", str(path)],
                   check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(path)


@pytest.fixture(scope="module")
def proxy(emulator):
    """A recording (and fault-injecting) proxy in front of the emulator: reads counted where they are served."""
    from aifs.testing.gcs_proxy import FaultyGCS

    gcs = FaultyGCS(emulator.url)
    yield gcs
    gcs.close()


@pytest.fixture(scope="session")
def spec(checkpoint) -> Spec:
    return Spec(checkpoint)


@pytest.fixture
def bucket(client):
    """A fresh, empty bucket on the module's emulator."""
    return client.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def dirs(tmp_path) -> Dirs:
    return Dirs(tmp_path / "scratch")


@pytest.fixture
def emulator_env(monkeypatch, emulator, tmp_path):
    """For in-process main(): the worker finds the emulator as in production, through the env."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.chdir(tmp_path)  # no coiled-data.json is picked up from the repo
    return emulator.url


@pytest.fixture
def run_main(emulator_env, call_main):
    """In-process ``aifs.worker.__main__.main(argv)`` against the module's emulator: (exit code, output)."""
    return call_main


@pytest.fixture
def call_main(capsys, caplog):
    """In-process ``main(argv)`` with whatever STORAGE_EMULATOR_HOST the test set: (exit code, output)."""
    from aifs.worker.__main__ import main

    def _run(argv: list[str]) -> tuple[int, str]:
        caplog.clear()
        with kept_root_logging(), caplog.at_level(logging.INFO):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors
                code = exc.code
        out, err = capsys.readouterr()
        return code, "\n".join([out, err, caplog.text])

    return _run
