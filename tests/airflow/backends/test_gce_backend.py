"""gce backend: the exact Compute Engine requests, the SSH hook it uses, the remote command, and a
spot VM reclaimed mid-member (fake Compute API at the HTTP layer + a real sshd standing in for the VM).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest

from aifs import hostcontract
from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend, remote_job
from aifs.orchestration.backends.base import BadSettings
from aifs.orchestration.backends.gce import GCEBackend, HostGone
from .backend_helpers import FAKE_WORKER, SSH_CONN_ID, JobDir, Log, runs_of
from .fake_compute import FakeCompute

PROJECT, ZONE = "ens-project", "us-central1-a"
SA = "aifs-gpu@ens-project.iam.gserviceaccount.com"
IMAGE = "us-docker.pkg.dev/ens-project/aifs/worker:1.0"
RUN = RunInfo(dag_id="aifs_ens_forecast", run_id="scheduled__2025-06-01T00:00:00+00:00", date="20250601_0000")
VM = "aifs-ens-20250601-0000-9bf55e"  # date and the run's hash: one VM per DAG run
WORKER = WorkerSettings(bucket="ens-bucket", checkpoint="/scratch/aifs-ens-1.0.ckpt", precision="16", num_chunks=16)
STARTUP = "#!/bin/bash\n# test startup script\ntouch /var/lib/aifs/ready\n"


def gce(**overrides) -> GCEBackend:
    settings = {"project_id": PROJECT, "zone": ZONE, "service_account": SA, "image": IMAGE, "startup_script": STARTUP}
    settings.update(overrides)
    return get_backend("gce", settings)


@pytest.fixture
def no_ssh():
    """For the pure Compute Engine tests: readiness over SSH is tested below, with a real sshd."""
    with mock.patch.object(remote_job, "wait_until_ready", return_value="ok") as ready:
        yield ready


def test_create_sends_the_exact_insert_request_and_is_idempotent(no_ssh):
    fake = FakeCompute(PROJECT, ZONE)
    backend = gce(spot=True, max_run_hours=10, labels={"team": "AI Quest"})
    with fake.patched():
        facts = backend.create_host(RUN, Log())
        again = backend.create_host(RUN, Log())

    instance = f"/instances/{VM}"
    assert fake.calls() == [
        ("GET", instance),  # does it exist?
        ("POST", "/instances"),  # no: insert
        ("GET", "/operations/operation-insert-1"),  # wait for the operation
        ("GET", instance),  # second create_host: it exists, nothing sent
    ]
    body = fake.bodies("POST")[0]
    assert body == {
        "name": VM,
        "machineType": f"zones/{ZONE}/machineTypes/a2-ultragpu-1g",  # A100 80 GB comes with the machine type
        "disks": [{
            "boot": True,
            "autoDelete": True,
            "initializeParams": {
                "sourceImage": "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570",
                "diskSizeGb": "150",
                "diskType": f"zones/{ZONE}/diskTypes/pd-balanced",
            },
        }],
        "networkInterfaces": [{"network": "global/networks/default"}],  # no accessConfigs: no public IP
        "scheduling": {
            "onHostMaintenance": "TERMINATE",
            "automaticRestart": False,
            "provisioningModel": "SPOT",
            "instanceTerminationAction": "DELETE",
            "maxRunDuration": {"seconds": "36000"},  # self-destruct after 10 h
        },
        "serviceAccounts": [{"email": SA, "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}],
        "metadata": {"items": [
            {"key": "enable-oslogin", "value": "TRUE"},
            {"key": "startup-script", "value": STARTUP},
            {"key": hostcontract.METADATA_WORKER_IMAGE, "value": IMAGE},
        ]},
        "labels": {
            "app": "aifs-ens",
            "dag": "aifs_ens_forecast",
            "run": "scheduled__2025-06-01t00-00-00-00-00",
            "date": "20250601-0000",
            "run-hash": "9bf55e",  # with the date: which run owns the VM
            "team": "ai-quest",
        },
    }
    assert "guestAccelerators" not in body
    assert facts["created"] is True and again["created"] is False
    assert no_ssh.call_count == 2  # both waited for readiness (the second finds it at once)


@pytest.mark.parametrize(
    ("settings", "machine", "accelerators", "model"),
    [
        ({"gpu": "l4"}, "g2-standard-16", None, "STANDARD"),
        ({"gpu": "h100", "spot": True}, "a3-highgpu-1g", None, "SPOT"),
        (
            {"machine_type": "n1-standard-16", "accelerator_type": "nvidia-tesla-t4", "accelerator_count": 2},
            "n1-standard-16",
            [{"acceleratorType": f"zones/{ZONE}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 2}],
            "STANDARD",
        ),
    ],
)
def test_gpu_choices_reach_the_request(no_ssh, settings, machine, accelerators, model):
    fake = FakeCompute(PROJECT, ZONE)
    with fake.patched():
        gce(**settings).create_host(RUN, Log())
    body = fake.bodies("POST")[0]
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/{machine}"
    assert body.get("guestAccelerators") == accelerators
    assert body["scheduling"]["provisioningModel"] == model
    assert body["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"


def test_delete_tolerates_already_gone_and_half_created(no_ssh):
    fake = FakeCompute(PROJECT, ZONE)
    fake.add(VM)
    log = Log()
    with fake.patched():
        gce().delete_host(RUN, log)
        gce().delete_host(RUN, log)  # the VM deleted itself / teardown ran twice
    assert fake.calls() == [
        ("DELETE", f"/instances/{VM}"),
        ("GET", "/operations/operation-delete-1"),
        ("DELETE", f"/instances/{VM}"),
    ]
    assert log == [f"[aifs] deleted VM {VM}", f"[aifs] VM {VM} is already gone"]


def test_failed_creation_propagates_and_delete_still_works(no_ssh):
    """Creation failing half-way (e.g. no A100 capacity): the DAG then calls delete_host, which must not fail."""
    fake = FakeCompute(PROJECT, ZONE)
    original = fake.handle

    def no_capacity(method, url, body):
        if method == "POST":
            fake.sent.append((method, url, None))
            return 503, {"error": {"code": 503, "message": "ZONE_RESOURCE_POOL_EXHAUSTED", "errors": []}}
        return original(method, url, body)

    fake.handle = no_capacity
    with fake.patched():
        with pytest.raises(Exception, match="ZONE_RESOURCE_POOL_EXHAUSTED"):
            gce().create_host(RUN, Log())
        gce().delete_host(RUN, Log())
    assert fake.calls()[-1] == ("DELETE", f"/instances/{VM}")


def test_a_preempted_vm_is_replaced(no_ssh):
    fake = FakeCompute(PROJECT, ZONE)
    fake.add(VM, status="TERMINATED")
    log = Log()
    with fake.patched():
        assert gce(spot=True).create_host(RUN, log)["created"] is True
    assert [c for c in fake.calls() if c[1].startswith("/instances")] == [
        ("GET", f"/instances/{VM}"), ("DELETE", f"/instances/{VM}"), ("POST", "/instances"),
    ]
    assert "is TERMINATED (preempted or stopped): replacing it" in log[0]


def test_settings_are_validated():
    with pytest.raises(BadSettings, match="service_account"):
        get_backend("gce", {"project_id": PROJECT, "zone": ZONE, "image": IMAGE})
    with pytest.raises(BadSettings, match="gpu"):
        gce(gpu="a100-160gb")


def test_members_reach_the_vm_over_compute_engine_ssh_os_login_and_iap():
    from airflow.providers.google.cloud.hooks.compute_ssh import ComputeEngineSSHHook

    seen = {}
    client = mock.MagicMock()

    def get_conn(hook):
        seen.update(vars(hook))
        return client

    with mock.patch.object(ComputeEngineSSHHook, "get_conn", get_conn):
        assert gce(keepalive_interval=20)._connect(RUN) is client
    assert {k: seen[k] for k in ("instance_name", "zone", "project_id", "use_oslogin", "use_iap_tunnel",
                                  "use_internal_ip", "gcp_conn_id", "cmd_timeout")} == {
        "instance_name": VM, "zone": ZONE, "project_id": PROJECT, "use_oslogin": True, "use_iap_tunnel": True,
        "use_internal_ip": True, "gcp_conn_id": "google_cloud_default", "cmd_timeout": None,
    }
    client.get_transport.return_value.set_keepalive.assert_called_once_with(20)


def test_the_rendered_remote_command_runs_the_worker_container_detached():
    backend = gce(env={"ANEMOI_INFERENCE_NUM_CHUNKS": "16"})
    name = RUN.job_name(3)
    script = remote_job.job_script(backend.settings, name, WORKER.worker_args(RUN.date, 3))
    run_line = next(line for line in script.splitlines() if line.strip().startswith("docker run"))
    assert run_line.endswith(" >/dev/null || exit $?")
    assert shlex.split(run_line.removesuffix(" >/dev/null || exit $?")) == [
        "docker", "run", "-d", "--name", "aifs-20250601-0000-9bf55e-m003", "--label", "aifs-job=aifs-20250601-0000-9bf55e-m003",
        "--gpus", "all", "--shm-size", "16g", "-v", "/scratch:/scratch", "-e", "ANEMOI_INFERENCE_NUM_CHUNKS=16",
        "--entrypoint", "python", IMAGE, "-m", "aifs.worker",
        "--date", "20250601_0000", "--members", "3", "--bucket", "ens-bucket",
        "--checkpoint", "/scratch/aifs-ens-1.0.ckpt", "--lead-time", "792", "--upload-threads", "5",
        "--precision", "16", "--num-chunks", "16",
    ]
    assert "docker wait aifs-20250601-0000-9bf55e-m003" in script
    assert "docker container inspect aifs-20250601-0000-9bf55e-m003" in script  # adopt, never a second copy
    # the host-side commands run as root via sudo (OS Login users have passwordless sudo)
    command = remote_job.remote_command(remote_job.ENSURE_SH, [hostcontract.JOBS_DIR, name], sudo=True)
    assert command.startswith("sudo -n bash -c ")
    assert shlex.split(command)[-2:] == [hostcontract.JOBS_DIR, name]


def test_each_generation_gets_its_own_image_in_the_request_the_readiness_probe_and_the_job(no_ssh):
    """``images`` names v1's image; ``image`` runs every generation it does not name (here v2)."""
    import dataclasses

    from aifs.orchestration.backends import gce as gce_module

    v1_image = "us-docker.pkg.dev/ens-project/aifs/worker:v1"
    backend = gce(images={"v1": v1_image})
    fake = FakeCompute(PROJECT, ZONE)
    for generation, image in (("v1", v1_image), ("v2", IMAGE)):
        run = dataclasses.replace(RUN, run_id=f"manual__{generation}", generation=generation)  # a VM per run
        with fake.patched():
            backend.create_host(run, Log())
        body = fake.bodies("POST")[-1]
        assert body["name"] == backend.instance_name(run)
        assert body["metadata"]["items"][1:] == [  # the startup script pulls the generation's image
            {"key": "startup-script", "value": STARTUP}, {"key": hostcontract.METADATA_WORKER_IMAGE, "value": image},
        ]
        assert body["labels"]["generation"] == generation
        assert no_ssh.call_args.args[1]["image"] == image  # ready means this image is on the VM

        with mock.patch.object(GCEBackend, "ensure_vm", return_value=False), \
                mock.patch.object(gce_module, "new_remote_job") as job, \
                mock.patch.object(gce_module, "run_remote_member", return_value=0) as run_remote:
            assert backend.run_member(run, 3, WORKER, Log()) == 0
        settings = run_remote.call_args.args[1]
        script = remote_job.job_script(settings, run.job_name(3), WORKER.worker_args(run.date, 3))
        assert f" --entrypoint python {image} -m aifs.worker " in script
        assert job.call_count == 1
        assert backend.environment_for(generation) == f"worker image {image}"
    # a run checked before generations existed: the one image, as before
    assert backend.instance_body(RUN)["metadata"]["items"][-1]["value"] == IMAGE and "generation" not in backend.instance_body(RUN)["labels"]
    with pytest.raises(BadSettings, match="images"):
        gce(images={"v9": "x"})


# -- a spot VM reclaimed mid-member ---------------------------------------------------------------


def test_reclaimed_vm_is_recreated_by_the_retry_and_the_member_completes(sshd, tmp_path, monkeypatch):
    """Compute API faked at the HTTP layer; the "VM" is the loopback sshd with its own disk dir."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    from aifs.orchestration.backends.ssh import open_ssh_client

    disk = tmp_path / "vm-disk"
    runs = tmp_path / "runs"

    def boot(body):  # what the startup script does on a fresh VM: an empty disk, then the marker
        shutil.rmtree(disk, ignore_errors=True)
        (disk / "jobs").mkdir(parents=True)
        (disk / "ready").write_text("")
        boots.append(body["name"])

    boots: list[str] = []
    fake = FakeCompute(PROJECT, ZONE, on_insert=boot)
    backend = gce(
        spot=True,
        launch="process",
        python=str(FAKE_WORKER),
        sudo=False,
        jobs_dir=str(disk / "jobs"),
        ready_marker=str(disk / "ready"),
        failed_marker=str(disk / "failed"),
        gpu_check="echo 'GPU 0: NVIDIA A100-SXM4-80GB'",
        ready_timeout=20,
        poll_interval=0.1,
        heartbeat=1,
        reconnect_attempts=2,
        reconnect_delay=0.1,
        env={"FAKE_RUNS": str(runs), "FAKE_STEPS": "10", "FAKE_SLEEP": "0.2"},
    )
    monkeypatch.setattr(backend, "_connect", lambda run: open_ssh_client(SSHHook(ssh_conn_id=SSH_CONN_ID, cmd_timeout=None), 30))
    job = JobDir(disk / "jobs" / RUN.job_name(5))

    with fake.patched():
        backend.create_host(RUN, Log())  # setup task
        log = Log()
        pool = ThreadPoolExecutor(max_workers=1)
        attempt1 = pool.submit(backend.run_member, RUN, 5, WORKER, log)
        log.wait_for("step 2")
        # Spot reclaim: Compute Engine deletes the VM; its processes and sessions die with it.
        del fake.instances[VM]
        sshd.kill_sessions()
        os.killpg(job.pgid(), signal.SIGKILL)
        with pytest.raises(HostGone, match="gone while member 5 ran"):
            attempt1.result(timeout=30)
        pool.shutdown()

        retry_log = Log()
        assert backend.run_member(RUN, 5, WORKER, retry_log) == 0  # the task's retry
        backend.delete_host(RUN, Log())  # teardown
        backend.delete_host(RUN, Log())  # ... and again: already gone is fine

    assert boots == [VM, VM]
    assert any("was gone (spot reclaim" in line for line in retry_log)
    assert "step 10" in retry_log
    assert len(runs_of(runs)) == 2  # the reclaimed attempt and the completing one
    assert job.launches()[0].endswith("launch 1 prev=none") and len(job.launches()) == 1  # fresh disk, one launch
    assert job.exit_code() == 0
    posts = [c for c in fake.calls() if c[0] in ("POST", "DELETE")]
    assert posts == [("POST", "/instances"), ("POST", "/instances"), ("DELETE", f"/instances/{VM}"), ("DELETE", f"/instances/{VM}")]
    assert fake.bodies("POST")[0] == fake.bodies("POST")[1]  # recreated exactly as created
