"""The DAG under a real scheduler: members never overlap, and clearing one index reruns it alone.

``dag.test()`` runs tasks one at a time whatever the DAG says, so it cannot show that
``max_active_tis_per_dagrun=1`` holds. Here a real Airflow runs (api-server, scheduler,
dag-processor; LocalExecutor with room for several tasks at once; SQLite), driven through its
REST API as an operator would, with the local backend, the real worker and the GCS emulator.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import airflow_env, local_deployment, run_conf, scratch_leftovers

from aifs import layout
from aifs.testing.emulator import free_port

pytestmark = pytest.mark.slow

DAG_ID = "aifs_ens_forecast"
DISPATCH_PYTHON = Path(__file__).resolve().parent / "dispatch_python.sh"
MEMBER_TIMEOUT_S = 60
DATE = "20250601_0000"
LOGICAL_DATE = "2025-06-01T00:00:00Z"


class Airflow:
    """api-server + scheduler + dag-processor in a temporary AIRFLOW_HOME, and a small REST client."""

    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **airflow_env(home),
            **extra_env,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",  # room to run members at once, were the DAG to allow it
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "8",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": "aifs-tests-only",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
        self.processes: list[subprocess.Popen] = []
        self.token: str | None = None

    def start(self) -> "Airflow":
        airflow = [str(Path(os.sys.executable).parent / "airflow")]
        subprocess.run(airflow + ["db", "migrate"], env=self.env, check=True, capture_output=True, timeout=300)
        for component in (["api-server", "--port", str(self.port)], ["scheduler"], ["dag-processor"]):
            log = open(self.home / f"{component[0]}.log", "wb")
            self.processes.append(
                subprocess.Popen(airflow + component, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        self.wait_for(lambda: self._get_raw("/api/v2/monitor/health"), "the api-server to answer", timeout=180)
        self.token = json.loads(self._get_raw("/auth/token"))["access_token"]
        self.wait_for(lambda: self.get(f"/api/v2/dags/{DAG_ID}"), "the dag-processor to parse the DAG", timeout=180)
        return self

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    # -- REST ------------------------------------------------------------------------------

    def _get_raw(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def request(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{method} {path}: HTTP {err.code}: {err.read().decode()}") from None

    def get(self, path: str):
        try:
            return self.request("GET", path)
        except AssertionError:
            return None

    def wait_for(self, probe, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise AssertionError(f"{process.args[1]} exited ({process.returncode}) while waiting for {what}; logs in {self.home}")
            result = probe()
            if result:
                return result
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; logs in {self.home}")

    def run_state(self, run_id: str) -> str:
        return self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")["state"]

    def wait_for_run(self, run_id: str, timeout: float = 300) -> str:
        return self.wait_for(lambda: self.run_state(run_id) if self.run_state(run_id) in ("success", "failed") else None,
                             f"run {run_id} to finish", timeout)

    def task_instances(self, run_id: str) -> list[dict]:
        return self.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]


@pytest.fixture(scope="module")
def airflow(emulator, worker_python):
    home = Path(tempfile.mkdtemp(prefix="aifs-scheduler-test-"))
    (home / "fake-long-once").mkdir()
    env = {
        "STORAGE_EMULATOR_HOST": emulator.url,
        "AIFS_WORKER_PYTHON": worker_python,
        # the real worker, except for the dates a test lists in fake_dates (dispatch_python.sh)
        **local_deployment(home / "scratch", worker_python=str(DISPATCH_PYTHON)),
        "AIFS_REAL_WORKER_PYTHON": worker_python,
        "AIFS_FAKE_DATES_FILE": str(home / "fake_dates"),
        "FAKE_RUNS": str(home / "fake_runs"),
        "FAKE_TIMES": str(home / "fake_times"),
        "FAKE_LONG_ONCE": str(home / "fake-long-once"),
        "FAKE_LONG_MEMBERS": "1 2",
        "FAKE_LONG_STEPS": "600",
        "FAKE_STEPS": "2",
        "FAKE_SLEEP": "0.5",
        # a member's deadline on the host (and, after the GPU wait and 5 more minutes, Airflow's own execution_timeout)
        "AIFS_ENS_MEMBER_TIMEOUT_MIN": str(MEMBER_TIMEOUT_S / 60),
    }
    stack = Airflow(home, env)
    try:
        yield stack.start()
    finally:
        stack.stop()


def parse_time(text: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_members_run_one_at_a_time_and_one_index_can_be_rerun_alone(airflow, gcs, bucket, seed, tiny_checkpoint):
    seed(bucket, DATE, "1-3")
    conf = run_conf(bucket, tiny_checkpoint, members="1-3", lead_time=72)
    airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    run = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": LOGICAL_DATE, "conf": conf})
    run_id = run["dag_run_id"]

    assert airflow.wait_for_run(run_id) == "success", airflow.task_instances(run_id)

    # -- serial: no two run_member instances were ever running at the same time ---------------
    tis = airflow.task_instances(run_id)
    members = sorted((ti for ti in tis if ti["task_id"] == "run_member"), key=lambda ti: ti["start_date"])
    assert [ti["rendered_map_index"] for ti in sorted(members, key=lambda ti: ti["map_index"])] == [
        "member 001", "member 002", "member 003"
    ]
    assert all(ti["state"] == "success" for ti in members)
    spans = [(parse_time(ti["start_date"]), parse_time(ti["end_date"])) for ti in members]
    for (_, end), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= end, f"run_member instances overlapped: {spans}"
    manifests = {m: gcs.bucket(bucket).get_blob(layout.manifest_object(DATE, m)) for m in (1, 2, 3)}
    assert all(manifests.values())
    tries_before = {(ti["task_id"], ti["map_index"]): ti["try_number"] for ti in tis}

    # -- clear member 002 (index 1) through the REST API: it reruns with its host, nothing else ----
    gcs.bucket(bucket).blob(layout.manifest_object(DATE, 2)).delete()  # so the rerun has real work
    cleared = airflow.request(
        "POST",
        f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
        {"dag_run_id": run_id, "task_ids": [["run_member", 1]], "dry_run": False, "only_failed": False},
    )
    assert sorted((ti["task_id"], ti["map_index"]) for ti in cleared["task_instances"]) == [
        ("create_host", -1), ("delete_host", -1), ("run_member", 1)
    ]
    airflow.wait_for(lambda: airflow.run_state(run_id) in ("queued", "running") or None, "the run to restart", 60)
    assert airflow.wait_for_run(run_id) == "success", airflow.task_instances(run_id)

    tries_after = {(ti["task_id"], ti["map_index"]): ti["try_number"] for ti in airflow.task_instances(run_id)}
    rerun = {key for key in tries_after if tries_after[key] != tries_before[key]}
    assert rerun == {("create_host", -1), ("run_member", 1), ("delete_host", -1)}
    assert gcs.bucket(bucket).get_blob(layout.manifest_object(DATE, 2)) is not None  # member 2 really ran again
    for member in (1, 3):
        assert gcs.bucket(bucket).get_blob(layout.manifest_object(DATE, member)).generation == manifests[member].generation
    assert scratch_leftovers(airflow.home / "scratch") == []  # the rerun's teardown cleaned up too


FAKE_DATE, FAKE_LOGICAL_DATE = "20250602_0000", "2025-06-02T00:00:00Z"


def test_a_killed_or_timed_out_member_is_stopped_on_the_host_and_the_next_never_overlaps(airflow, bucket, seed, tiny_checkpoint):
    """Member 1 is marked failed while it runs; member 2 outlives its timeout. Judged by the jobs'
    own start and end times on the host (the fake worker records them), not by Airflow's."""
    from backends.backend_helpers import assert_no_overlap, job_spans

    seed(bucket, FAKE_DATE, "1-3")
    (airflow.home / "fake_dates").write_text(FAKE_DATE + "\n")
    times = airflow.home / "fake_times"

    def jobs(member=None):
        return [s for s in job_spans(times) if f"--date {FAKE_DATE}" in s[2] and (member is None or f"--members {member} " in s[2])]

    airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    conf = run_conf(bucket, tiny_checkpoint, members="1-3", lead_time=72)  # real: choose_environment reads it
    run_id = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": FAKE_LOGICAL_DATE, "conf": conf})["dag_run_id"]

    airflow.wait_for(lambda: jobs(1), "member 1's job to start", timeout=180)
    time.sleep(3)
    airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/run_member/0", {"new_state": "failed"})
    marked = time.time()
    airflow.wait_for_run(run_id, timeout=MEMBER_TIMEOUT_S + 240)

    spans = jobs()
    assert_no_overlap(spans)  # never two members' jobs on the GPU at once
    (m1_start, m1_end, _), = jobs(1)
    assert m1_end - marked < 30, "marking member 1 failed did not stop its job (its on_kill did nothing)"
    (m2_start, m2_end, _), (retry_start, _, _) = jobs(2)
    # stopped by the host at its deadline from launch, not when it would have ended (600 x 0.5 s)
    assert MEMBER_TIMEOUT_S - 1 <= m2_end - m2_start <= MEMBER_TIMEOUT_S + 30, (m2_start, m2_end)
    assert retry_start >= m2_end and len(jobs(3)) == 1
    states = {ti["map_index"]: (ti["state"], ti["try_number"]) for ti in airflow.task_instances(run_id) if ti["task_id"] == "run_member"}
    assert states[0][0] == "failed" and states[1] == ("success", 2) and states[2][0] == "success", states
