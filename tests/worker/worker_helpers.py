"""Helpers shared by the worker tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import aifs

#: The directory holding the ``aifs`` package these tests import (subprocesses get the same one).
PLUGINS = Path(aifs.__file__).resolve().parents[1]
DATE = "20250601_0000"
SHORT_LEAD = 150  # three windows: h000-072, h072-144, h144-150


class Spec:
    """What the checkpoint says, read independently of the worker (anemoi-inference metadata)."""

    def __init__(self, path: str):
        from anemoi.inference.checkpoint import Checkpoint

        (md,) = Checkpoint(path).multi_dataset_metadata.values()
        computed = set(md.model_computed_variables)
        self.input_variables = [v for v in md.variable_to_input_tensor_index if v not in computed]
        self.output_variables = list(md.output_tensor_index_to_variable.values())
        self.grid_points = int(md.number_of_grid_points)
        self.time_levels = int(md.multi_step_input)
        meta = md.variables_metadata
        self.output_short_names = {meta[v]["mars"]["param"] for v in self.output_variables}


# --- inputs --------------------------------------------------------------------------------------


def make_state(checkpoint: str, date: str = DATE, member: int = 1) -> dict:
    from aifs.layout import parse_date
    from aifs.testing.synthetic import make_input_state, synthetic_input_seed

    when = parse_date(date)
    return make_input_state(checkpoint, when, seed=synthetic_input_seed(when, member))


def upload_bytes(bucket, name: str, data: bytes) -> None:
    bucket.blob(name).upload_from_string(data, content_type="application/octet-stream", checksum="crc32c")


def upload_state(bucket, state, member: int, date: str = DATE) -> None:
    from aifs.layout import input_object

    upload_bytes(bucket, input_object(date, member), pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def seed(bucket, checkpoint: str, members, date: str = DATE) -> None:
    for member in members:
        upload_state(bucket, make_state(checkpoint, date, member), member, date)


# --- running the worker --------------------------------------------------------------------------


class Dirs:
    def __init__(self, root: Path):
        self.input = root / "input"
        self.output = root / "output"
        self.input.mkdir(parents=True, exist_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[str]:
        return sorted(str(p) for d in (self.input, self.output) for p in d.rglob("*") if p.is_file())


def worker_args(*, bucket: str, checkpoint: str, dirs: Dirs, members: str = "1", date: str = DATE,
                lead_time: int = SHORT_LEAD, extra=()) -> list[str]:
    return [
        "--date", date, "--members", members, "--bucket", bucket, "--checkpoint", checkpoint,
        "--input-dir", str(dirs.input), "--output-dir", str(dirs.output), "--lead-time", str(lead_time),
        "--device", "cpu", "--upload-threads", "2", *extra,
    ]


def subprocess_env(emulator_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["STORAGE_EMULATOR_HOST"] = emulator_url
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def worker_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "aifs.worker", *args]


def run_worker_subprocess(args: list[str], emulator_url: str, cwd: Path, timeout: float = 180):
    """``python -m aifs.worker ARGS`` as a separate process: (exit code, stdout+stderr)."""
    proc = subprocess.run(
        worker_command(args), env=subprocess_env(emulator_url), cwd=str(cwd),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return proc.returncode, proc.stdout


# --- reading the bucket back ---------------------------------------------------------------------


def object_names(client, bucket_name: str, prefix: str = "") -> list[str]:
    return sorted(b.name for b in client.list_blobs(bucket_name, prefix=prefix))


def forecast_names(client, bucket_name: str, date: str = DATE) -> list[str]:
    from aifs.layout import forecast_prefix

    return object_names(client, bucket_name, forecast_prefix(date))


def manifest_names(client, bucket_name: str, date: str = DATE) -> list[str]:
    from aifs.layout import manifest_prefix

    return object_names(client, bucket_name, manifest_prefix(date))


def read_manifest(bucket, member: int, date: str = DATE):
    from aifs.layout import manifest_object
    from aifs.manifest import Manifest

    blob = bucket.get_blob(manifest_object(date, member))
    return None if blob is None else Manifest.from_json(blob.download_as_bytes())


def expected_forecast_objects(member: int, lead_time: int, date: str = DATE) -> list[str]:
    from aifs.layout import forecast_object, windows

    return [forecast_object(date, member, w.start, w.end) for w in windows(lead_time)]


def tagged(text: str, tag: str) -> list[str]:
    return [line for line in text.splitlines() if tag in line]


@contextlib.contextmanager
def kept_root_logging():
    """Around an in-process ``main()`` of aifs.worker or aifs.inputs: both reconfigure root logging
    (basicConfig(force=True)) and install a SIGTERM handler; afterwards pytest gets its handlers,
    level and SIGTERM handler back."""
    root = logging.getLogger()
    handlers, level, sigterm = list(root.handlers), root.level, signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        signal.signal(signal.SIGTERM, sigterm)


# Fixtures the worker tests of both environments (tests/worker, tests/worker_v2) share: their
# conftest.py imports them by name.

@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """One in-memory gcp-storage-emulator process per test module; each test gets its own bucket."""
    from aifs.testing.emulator import StorageEmulator

    emu = StorageEmulator(log_path=str(tmp_path_factory.mktemp("emulator") / "emulator.log")).start()
    yield emu
    emu.stop()


@pytest.fixture
def client(emulator):
    from aifs.testing.emulator import anonymous_client

    return anonymous_client(emulator.url)
