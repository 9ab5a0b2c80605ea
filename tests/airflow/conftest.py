"""Airflow-side tests: real Airflow (SQLite, per session), real GCS emulator, real worker subprocess.

Run with Airflow's environment: ``.venv-airflow/bin/python -m pytest tests/airflow``. The worker
runs in its own environment, found through $AIFS_WORKER_PYTHON (the Makefile sets it to
.venv/bin/python), as the ``local`` backend does in production.

Airflow reads its configuration when first imported, so the environment below is set at
conftest import, before any test module imports Airflow.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
DAGS = REPO / "dags"
DAG_FILE = DAGS / "aifs_ens_forecast.py"

AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="aifs-airflow-tests-"))


def airflow_env(home: Path) -> dict[str, str]:
    """Configuration of an isolated Airflow: its own home and SQLite DB, this repo's DAGs, no examples."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # the scheduled daily run must not start on its own during tests
        "AIFS_ENS_SCHEDULE": "none",
        # the forecast DAG on its cron, as the tests of its own scheduling (backfills) need; the inputs
        # trigger (the default) is set by the tests of the asset-driven loop
        "AIFS_ENS_FORECAST_TRIGGER": "time",
        # retries keep their production counts, but their first delay is 1 s instead of 2 minutes
        "AIFS_ENS_RETRY_DELAY_S": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p),
    }


#: Buckets a test may use: the deployment allows only listed buckets, so tests draw from this list.
TEST_BUCKETS = [f"aifs-test-{i:03d}" for i in range(200)]
#: Checkpoints a test may name: the deployment allows only listed ones (the tiny model, and a name
#: for runs that never load one).
TEST_CHECKPOINTS = {str(AIRFLOW_HOME / "tiny-o48.ckpt"): {"identity": None}, "tiny.ckpt": {"identity": None}}
#: The same checkpoints with identities, as a GPU-host backend requires (AIFS_ENS_CHECKPOINTS), and their
#: generation: paths on a GPU host, which Airflow cannot read, are declared.
PINNED_TEST_CHECKPOINTS = json.dumps({ref: {"identity": "sha256:" + "0" * 64, "generation": "v1"} for ref in TEST_CHECKPOINTS})


def deployment_lists() -> dict[str, str]:
    """The deployment's allowed buckets and checkpoints for every DAG parsed by the tests (scheduler stacks too)."""
    return {"AIFS_ENS_BUCKETS": json.dumps(TEST_BUCKETS), "AIFS_ENS_CHECKPOINTS": json.dumps(TEST_CHECKPOINTS)}


def local_deployment(scratch: Path, **host) -> dict[str, str]:
    """An admin's settings for a test deployment: the local backend on CPU, with its scratch dir."""
    settings = {"scratch_dir": str(scratch), "device": "cpu", "min_free_gb": 0, **host}
    return {"AIFS_ENS_BACKEND": "local", "AIFS_ENS_HOST": json.dumps(settings)}


os.environ.update(airflow_env(AIRFLOW_HOME))
os.environ.update(deployment_lists())
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))


def find_worker_python() -> str | None:
    candidates = [os.environ.get("AIFS_WORKER_PYTHON"), str(REPO / ".venv" / "bin" / "python")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


# -- Airflow ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated metadata DB for this session (SQLite in the temp AIRFLOW_HOME)."""
    from airflow.utils import db

    db.initdb()
    return AIRFLOW_HOME


def load_dag():
    """Parse the DAG file as Airflow does, under the deployment settings now in os.environ."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("aifs_ens_forecast")


@pytest.fixture
def scratch(tmp_path) -> Path:
    """The test deployment's host: the local backend keeps a run's files here (absent until a host is made)."""
    return tmp_path / "scratch"


@pytest.fixture
def deployment(monkeypatch, scratch) -> dict[str, str]:
    """The admin's settings of this test's deployment (backend, host), as environment variables."""
    env = local_deployment(scratch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def dag(airflow_db, deployment):
    """The DAG as Airflow loads it from the DAGs folder, fresh for each test, under ``deployment``.

    Fresh because tasks run by dag.test() in this process write the run's conf into the DAG
    object's params, and a later dag.test() would inherit them (a real task process parses anew).
    """
    return load_dag()


# -- storage ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emulator():
    """A real gcp-storage-emulator process; the whole session (Airflow tasks, worker) talks to it."""
    from aifs.testing.emulator import StorageEmulator

    emu = StorageEmulator(log_path=str(AIRFLOW_HOME / "emulator.log")).start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    yield emu
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    emu.stop()


@pytest.fixture(scope="session")
def gcs(emulator):
    from aifs.orchestration.storage import storage_client

    return storage_client()


_bucket_counter = iter(TEST_BUCKETS)


@pytest.fixture
def bucket(gcs):
    """A fresh, empty bucket for one test (one the test deployment allows)."""
    return gcs.create_bucket(next(_bucket_counter)).name


# -- worker -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def worker_python() -> str:
    python = find_worker_python()
    if python is None:
        pytest.fail("no worker environment: set AIFS_WORKER_PYTHON (make test-airflow does) or run make env")
    os.environ["AIFS_WORKER_PYTHON"] = python
    return python


def worker_run(worker_python: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([worker_python, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="session")
def tiny_checkpoint(worker_python) -> str:
    """The tiny O48 stand-in for AIFS-ENS: the real anemoi-inference runner loads it."""
    path = AIRFLOW_HOME / "tiny-o48.ckpt"
    worker_run(worker_python, "-m", "aifs.testing", "checkpoint", "--grid", "O48", "--out", str(path))
    return str(path)


@pytest.fixture
def seed(worker_python, tiny_checkpoint, emulator):
    """seed(bucket, date, members="1-3"): upload synthetic input pickles for the tiny model."""

    def _seed(bucket: str, date: str, members: str = "1-3") -> None:
        worker_run(
            worker_python, "-m", "aifs.testing", "seed",
            "--checkpoint", tiny_checkpoint, "--bucket", bucket, "--date", date, "--members", members,
        )

    return _seed


# -- alerts -----------------------------------------------------------------------------------


class AlertSink:
    """A local HTTP server standing in for a chat service: Apprise ``json://`` posts land here."""

    def __init__(self):
        self.messages: list[dict] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    sink.messages.append(json.loads(body))
                except ValueError:
                    sink.messages.append({"raw": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def apprise_url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_address[1]}/"

    def connection_env(self) -> str:
        return json.dumps({"conn_type": "apprise", "extra": {"config": {"path": self.apprise_url}}})

    def close(self):
        self.server.shutdown()


@pytest.fixture
def alert_sink(monkeypatch):
    """Alerts of this test go to a local HTTP sink through the ``aifs_alerts`` Apprise connection."""
    sink = AlertSink()
    monkeypatch.setenv("AIRFLOW_CONN_AIFS_ALERTS", sink.connection_env())
    yield sink
    sink.close()


# -- running the DAG --------------------------------------------------------------------------

FORECAST_DAY = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)


def run_conf(bucket: str, checkpoint: str, **overrides) -> dict:
    """A forecaster's params for a fast CPU run of the tiny model (backend and host: ``deployment``)."""
    conf = {
        "members": "1-3",
        "bucket": bucket,
        "checkpoint": checkpoint,
        "lead_time": 144,
        "upload_threads": 2,
        "input_wait_minutes": 0.2,
        "input_poke_seconds": 1,
    }
    conf.update(overrides)
    return conf


def scratch_leftovers(scratch: Path) -> list[str]:
    """Files runs left under a local host's scratch, less the machine's GPU lock (host-wide and kept, like /var/lock)."""
    from aifs.hostcontract import GPU_HOLDER, GPU_LOCK

    return [str(p.relative_to(scratch)) for p in Path(scratch).rglob("*") if p.is_file() and p.name not in (GPU_LOCK, GPU_HOLDER)]


def task_states(dag_run) -> dict[tuple[str, int], str | None]:
    return {(ti.task_id, ti.map_index): (str(getattr(ti.state, "value", ti.state)) if ti.state else None)
            for ti in dag_run.get_task_instances()}
