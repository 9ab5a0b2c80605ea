"""The run's edges don't leak, under ``dag.test()``: the host's teardown and setup retries on the gce
backend (Compute Engine faked at the HTTP layer: the exact requests are checked), a host left
behind named in the run's alert, and the bucket's transient errors (a real HTTP proxy in front of
the GCS emulator answers 503s to the real client).

Nothing here runs a worker: the members are marked done (``mark_success_pattern``), since what
is tested is what happens around them.
"""

from __future__ import annotations

import contextlib
import json
from unittest import mock
from urllib.parse import urlsplit

import pytest
from google.auth.transport.requests import AuthorizedSession

from conftest import FORECAST_DAY, PINNED_TEST_CHECKPOINTS, load_dag, run_conf, task_states

from aifs import layout
from aifs.orchestration.backends import RunInfo, get_backend, remote_job

from backends.fake_compute import FakeCompute, _error

DATE = "20250601_0000"
PROJECT, ZONE = "ens-project", "us-central1-a"
HOST = {
    "project_id": PROJECT,
    "zone": ZONE,
    "service_account": "aifs-gpu@ens-project.iam.gserviceaccount.com",
    "image": "us-docker.pkg.dev/ens-project/aifs/worker:1.0",
    "startup_script": "#!/bin/bash\ntouch /var/lib/aifs/ready\n",
}


class FlakyCompute(FakeCompute):
    """FakeCompute whose DELETE answers 503 on the tries in ``fail_deletes`` (1-based).

    ``deleted_anyway``: the VM is deleted before the 503 goes out, as when the API did the work
    but the answer was lost on the way; the retry then finds the VM already gone.
    """

    def __init__(self, *args, fail_deletes=(1,), deleted_anyway=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_deletes, self.deleted_anyway, self.deletes = set(fail_deletes), deleted_anyway, 0

    @contextlib.contextmanager
    def patched(self):
        """FakeCompute's patches, but only Compute Engine's requests come here: the DAG's tasks also
        talk to the GCS emulator through the same AuthorizedSession class, and that must stay real."""
        real_request = AuthorizedSession.request

        def request(session, method, url, *args, **kwargs):
            if urlsplit(url).path.startswith("/compute/"):
                return self._requests(session, method, url, *args, **kwargs)
            return real_request(session, method, url, *args, **kwargs)

        with super().patched(), mock.patch.object(AuthorizedSession, "request", request):
            yield self

    def handle(self, method, url, body):
        if method == "DELETE":
            self.deletes += 1
            if self.deletes in self.fail_deletes:
                if self.deleted_anyway:
                    super().handle(method, url, body)
                else:
                    self.sent.append((method, urlsplit(url).path, None))
                return 503, _error(503, "Service Unavailable: the backend is busy, try again")
        return super().handle(method, url, body)


@pytest.fixture
def gce_dag(airflow_db, monkeypatch):
    """The DAG under a deployment whose backend is gce (settings as an admin writes them)."""
    monkeypatch.setenv("AIFS_ENS_BACKEND", "gce")
    monkeypatch.setenv("AIFS_ENS_HOST", json.dumps(HOST))
    monkeypatch.setenv("AIFS_ENS_CHECKPOINTS", PINNED_TEST_CHECKPOINTS)
    # the hook looks its connection up; the fake answers whatever the credentials
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", json.dumps({"conn_type": "google_cloud_platform"}))
    return load_dag()


@pytest.fixture
def inputs_of_member_1(gcs, bucket):
    gcs.bucket(bucket).blob(layout.input_object(DATE, 1)).upload_from_string(b"input")
    return bucket


def vm_name(run_id: str) -> str:
    return get_backend("gce", HOST).instance_name(RunInfo(dag_id="aifs_ens_forecast", run_id=run_id, date=DATE))


def tries(dag_run, task_id: str) -> int:
    return next(ti.try_number for ti in dag_run.get_task_instances() if ti.task_id == task_id)


def ready_after(failures: int):
    """Stands in for the SSH readiness wait: the VM is 'not ready in time' on the first ``failures`` calls."""
    calls = []

    def wait_until_ready(connect, settings, log, what, timeout=None):
        calls.append(what)
        if len(calls) <= failures:
            raise remote_job.RemoteJobError(f"{what} not ready within {settings['ready_timeout']} s (boot still running)")
        return "ready"

    return mock.patch.object(remote_job, "wait_until_ready", side_effect=wait_until_ready), calls


# -- delete_host ----------------------------------------------------------------------------------


@pytest.mark.parametrize("deleted_anyway", [False, True], ids=["503-then-delete", "503-after-deleting-then-already-gone"])
def test_delete_host_survives_one_compute_api_error(gce_dag, inputs_of_member_1, deleted_anyway):
    bucket = inputs_of_member_1
    fake = FlakyCompute(PROJECT, ZONE, fail_deletes=(1,), deleted_anyway=deleted_anyway)
    patch, _ = ready_after(0)
    with fake.patched(), patch:
        dr = gce_dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, "tiny.ckpt", members="1"),
                          mark_success_pattern="run_member")

    states = task_states(dr)
    assert states[("create_host", -1)] == "success"
    assert states[("delete_host", -1)] == "success", states
    assert tries(dr, "delete_host") == 2  # the first try met the 503, its retry finished the job
    vm = f"/instances/{vm_name(dr.run_id)}"
    second_try = [("GET", "/operations/operation-delete-2")] if not deleted_anyway else []
    assert fake.calls() == [
        ("GET", vm), ("POST", "/instances"), ("GET", "/operations/operation-insert-1"),  # create_host
        ("DELETE", vm),  # delete_host try 1: 503
        ("DELETE", vm), *second_try,  # try 2: deleted, or 404 "already gone", which is success
    ]
    assert fake.instances == {}


# -- create_host ----------------------------------------------------------------------------------


def test_create_host_keeps_the_vm_for_its_next_try_and_deletes_it_after_the_last(gce_dag, inputs_of_member_1):
    """A VM slower to boot than ready_timeout on every try: one boot, adopted by tries 2 and 3, deleted after 3."""
    bucket = inputs_of_member_1
    fake = FlakyCompute(PROJECT, ZONE, fail_deletes=())
    patch, waits = ready_after(failures=3)
    with fake.patched(), patch:
        dr = gce_dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, "tiny.ckpt", members="1"),
                          mark_success_pattern="run_member")

    states = task_states(dr)
    assert states[("create_host", -1)] == "failed"
    assert tries(dr, "create_host") == 3 and len(waits) == 3
    assert states[("delete_host", -1)] in ("skipped", "upstream_failed")  # Airflow skips a failed setup's teardown
    vm = f"/instances/{vm_name(dr.run_id)}"
    assert fake.calls() == [
        ("GET", vm), ("POST", "/instances"), ("GET", "/operations/operation-insert-1"),  # try 1: boot; not ready
        ("GET", vm),  # try 2: adopts the VM (no delete, no second boot); not ready
        ("GET", vm),  # try 3: adopts it; not ready
        ("DELETE", vm), ("GET", "/operations/operation-delete-2"),  # after the last try: cleaned up
    ]
    assert fake.instances == {}
    assert dr.state == "failed"


def test_a_slow_first_boot_costs_one_boot(gce_dag, inputs_of_member_1):
    bucket = inputs_of_member_1
    fake = FlakyCompute(PROJECT, ZONE, fail_deletes=())
    patch, _ = ready_after(failures=1)
    with fake.patched(), patch:
        dr = gce_dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, "tiny.ckpt", members="1"),
                          mark_success_pattern="run_member")

    states = task_states(dr)
    assert states[("create_host", -1)] == states[("delete_host", -1)] == "success"
    assert tries(dr, "create_host") == 2
    vm = f"/instances/{vm_name(dr.run_id)}"
    assert fake.calls() == [
        ("GET", vm), ("POST", "/instances"), ("GET", "/operations/operation-insert-1"),  # try 1: boot; not ready
        ("GET", vm),  # try 2: the same VM, ready now
        ("DELETE", vm), ("GET", "/operations/operation-delete-2"),  # the teardown
    ]


# -- a host left behind -------------------------------------------------------------------------------


def test_a_host_left_behind_is_named_with_what_to_do(gce_dag, inputs_of_member_1, caplog):
    """create_host's last try fails and so does its cleanup: verify fails the run, its summary names the VM."""
    bucket = inputs_of_member_1
    fake = FlakyCompute(PROJECT, ZONE, fail_deletes=(1,))
    patch, _ = ready_after(failures=3)
    with fake.patched(), patch, caplog.at_level("INFO"):
        dr = gce_dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, "tiny.ckpt", members="1"),
                          mark_success_pattern="run_member")

    states = task_states(dr)
    assert dr.state == "failed" and states[("verify", -1)] == "failed"
    vm = vm_name(dr.run_id)
    assert vm in fake.instances  # still there: the cleanup's DELETE met a 503
    summary = next(r.getMessage() for r in caplog.records if "AIFS-ENS run summary" in r.getMessage())
    left = summary.splitlines()[-1]
    assert left.startswith("HOST LEFT BEHIND: create_host failed on its last try and could not delete the gce host")
    assert f"gcloud compute instances delete {vm} --zone {ZONE} --project {PROJECT} --quiet" in left


def test_summary_names_a_host_delete_host_left():
    from aifs.orchestration.summary import format_summary, host_left_behind

    host = {"backend": "gce", "instance": "aifs-ens-20250601-0000-1a2b3c", "project_id": PROJECT, "zone": ZONE}
    text = host_left_behind("gce", host, deleted=None)
    assert text.startswith("HOST LEFT BEHIND: delete_host did not succeed")
    assert "clear delete_host of this run" in text
    assert f"gcloud compute instances delete aifs-ens-20250601-0000-1a2b3c --zone {ZONE} --project {PROJECT} --quiet" in text
    assert host_left_behind("gce", host, deleted={"deleted": True}) is None
    assert host_left_behind("gce", None, deleted=None) is None  # no host was made (nothing planned)
    local = host_left_behind("local", {"scratch": "/scratch/run-1"}, deleted=None)
    assert "remove /scratch/run-1" in local
    summary = format_summary(DATE, "b", [{"member": 1, "state": "done", "minutes": 7.5}], text)
    assert summary.splitlines()[-1] == text


def test_which_failed_try_leaves_its_host_for_the_next():
    from airflow.sdk.exceptions import AirflowFailException

    from aifs.orchestration.retrying import is_last_try, will_retry

    # retries=2: tries 1 and 2 are retried, try 3 is the last (Airflow retries while try_number <= max_tries)
    assert [is_last_try(n, 2) for n in (1, 2, 3)] == [False, False, True]
    assert is_last_try(1, 0)  # no retries at all
    assert not is_last_try(4, 5)  # cleared after its last try: max_tries grew, the tries come back
    assert will_retry(RuntimeError("not ready"), 1, 2)
    assert not will_retry(AirflowFailException("bad settings"), 1, 2)  # never retried: clean up now
    assert not will_retry(RuntimeError("not ready"), 3, 2)
