"""CPU steps (aifs.orchestration.steps) on every backend: what runs where, without a GPU or its lock.

local and ssh run for real (a subprocess; a detached job over a real sshd); gce and gke cannot run
here, so their exact requests are checked (the Compute Engine REST body through the fake API at the
HTTP layer; the pod the provider's operator would create).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from unittest import mock

import pytest
from backends.backend_helpers import FAKE_DOCKER, SSH_CONN_ID, Log
from backends.conftest import sshd  # noqa: F401 - the real sshd fixture
from backends.fake_compute import FakeCompute

from aifs.hostcontract import GPU_LOCK
from aifs.orchestration.backends import RunInfo, get_backend, remote_job
from aifs.orchestration.backends.gce import cpu_startup_script

RUN = RunInfo(dag_id="aifs_ens_inputs", run_id="scheduled__2025-06-01T00:00:00+00:00", date="20250601_0000")
SECRET = "pw-81c0ffee-do-not-leak"
#: a step program the test writes: echoes its args, says whether it got the secret, exits as told
PROBE = """
import hashlib, os, sys
print("probe args:", " ".join(sys.argv[1:]), flush=True)
print("probe secret sha:", hashlib.sha256(os.environ.get("AIWQ_PASSWORD", "").encode()).hexdigest()[:12], flush=True)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""
SECRET_SHA = __import__("hashlib").sha256(SECRET.encode()).hexdigest()[:12]


@pytest.fixture
def probe_dir(tmp_path, monkeypatch):
    (tmp_path / "aifs_step_probe.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def code_lines(script: str) -> str:
    """A shell script's commands, less its comments (which may name what the commands no longer do)."""
    return "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))


def hold_gpu(path) -> object:
    """Hold a GPU lock as a running member would (flock on the lock file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, "a+")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


# -- local --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 21])
def test_local_step_runs_the_module_beside_a_member_holding_the_gpu(probe_dir, tmp_path, code, monkeypatch):
    scratch = tmp_path / "scratch"
    backend = get_backend("local", {"scratch_dir": str(scratch), "worker_python": sys.executable, "gpu_wait": 0})
    held = hold_gpu(scratch / GPU_LOCK)  # a member holds the GPU: a step neither waits for it nor fails
    monkeypatch.setenv("PROBE_EXIT", str(code))
    log = Log()
    try:
        got = backend.run_step(RUN, "inputs", "aifs_step_probe", ["--date", RUN.date], {"AIWQ_PASSWORD": SECRET}, log, timeout_s=60)
    finally:
        held.close()
    assert got == code
    assert f"$ {sys.executable} -m aifs_step_probe --date 20250601_0000" in log
    assert "probe args: --date 20250601_0000" in log and f"probe secret sha: {SECRET_SHA}" in log
    assert not any(SECRET in line for line in log)
    assert not list((scratch / "steps").glob("*.pid"))


# -- ssh: a detached job on the host, no GPU lock, no --gpus --------------------------------------------


def ssh_backend(tmp_path, **settings):
    return get_backend("ssh", {"ssh_conn_id": SSH_CONN_ID, "jobs_dir": str(tmp_path / "jobs"), "poll_interval": 0.1,
                               "gpu_wait": 0, "gpu_check": None, **settings})


def test_ssh_step_is_a_detached_process_job_that_ignores_the_gpu_lock(sshd, probe_dir, tmp_path):  # noqa: F811
    backend = ssh_backend(tmp_path, python=sys.executable,
                          env={"PYTHONPATH": os.environ["PYTHONPATH"], "PROBE_EXIT": "22"})
    held = hold_gpu(tmp_path / "jobs" / GPU_LOCK)
    log = Log()
    try:
        code = backend.run_step(RUN, "inputs", "aifs_step_probe", ["--members", "1-3"], {"AIWQ_PASSWORD": SECRET}, log, timeout_s=60)
    finally:
        held.close()
    assert code == 22
    assert "probe args: --members 1-3" in log and f"probe secret sha: {SECRET_SHA}" in log
    assert not any(SECRET in line for line in log)
    job = tmp_path / "jobs" / RUN.step_job_name("inputs")
    assert job.name == "aifs-20250601-0000-" + RUN.run_hash + "-inputs"
    assert (job / "args").read_text().splitlines() == ["-m", "aifs_step_probe", "--members", "1-3"]
    assert oct((job / "cmd").stat().st_mode & 0o777) == "0o700"  # the secret is in the job script: its owner's only
    assert not (tmp_path / "jobs" / "gpu.holder").exists()


def test_ssh_container_step_runs_the_image_without_gpus(tmp_path):
    settings = ssh_backend(tmp_path, launch="container", image="reg/worker:1", docker_args=["--network", "host"]).settings
    script = remote_job.step_script(settings, "aifs-x-inputs", "aifs.inputs", ["--date", "20250601_0000"], {"AIWQ_PASSWORD": SECRET})
    run_line = next(line for line in script.splitlines() if " run -d " in line)
    assert "--gpus" not in run_line
    assert ("docker run -d --name aifs-x-inputs --label aifs-job=aifs-x-inputs --shm-size 16g -v /scratch:/scratch "
            f"-e AIWQ_PASSWORD={SECRET} --network host --entrypoint python reg/worker:1 -m aifs.inputs --date 20250601_0000") in run_line


# -- gce: a CPU VM of its own, created and deleted around the step --------------------------------------

PROJECT, ZONE = "ens-project", "us-central1-a"
GCE = {"project_id": PROJECT, "zone": ZONE, "service_account": "w@ens-project.iam.gserviceaccount.com",
       "image": "us-docker.pkg.dev/ens-project/aifs/worker:1.0"}


def test_gce_step_runs_on_a_cpu_vm_made_and_deleted_around_it(tmp_path):
    fake = FakeCompute(PROJECT, ZONE)
    backend = get_backend("gce", GCE)
    ran = []

    def fake_step(settings, connect, run, step, module, args, env, log, timeout_s):
        ran.append((settings["launch"], settings["gpu_check"], step, module, list(args), timeout_s))
        return 21

    with fake.patched(), mock.patch.object(remote_job, "wait_until_ready", return_value="ok") as ready, \
            mock.patch("aifs.orchestration.backends.ssh.run_remote_step", side_effect=fake_step):
        code = backend.run_step(RUN, "inputs", "aifs.inputs", ["--date", RUN.date], {"AIWQ_PASSWORD": SECRET}, Log(), timeout_s=3600)
    vm = f"aifs-ens-20250601-0000-{RUN.run_hash}-inputs"
    assert code == 21
    assert ran == [("container", None, "inputs", "aifs.inputs", ["--date", "20250601_0000"], 3600)]
    assert ready.call_args.args[1]["gpu_check"] is None
    assert [c for c in fake.calls() if c[0] in ("POST", "DELETE")] == [("POST", "/instances"), ("DELETE", f"/instances/{vm}")]
    body = fake.bodies("POST")[0]
    assert body["name"] == vm
    assert body["machineType"] == f"zones/{ZONE}/machineTypes/n2-standard-8"
    assert "guestAccelerators" not in body
    assert body["scheduling"] == {"onHostMaintenance": "MIGRATE", "automaticRestart": False, "provisioningModel": "STANDARD",
                                  "instanceTerminationAction": "DELETE", "maxRunDuration": {"seconds": "7200"}}
    assert body["labels"]["step"] == "inputs" and body["labels"]["run-hash"] == RUN.run_hash
    startup = next(i["value"] for i in body["metadata"]["items"] if i["key"] == "startup-script")
    assert "nvidia-smi" not in code_lines(startup) and "docker pull" in startup and "READY_MARKER" in startup
    assert SECRET not in json.dumps(body)  # secrets go to the job over SSH, never into instance metadata


def test_cpu_startup_script_is_the_gpu_script_less_its_gpu_section(tmp_path):
    from aifs.orchestration.backends.gce import find_startup_script

    gpu = find_startup_script().read_text()
    cpu = cpu_startup_script(gpu)
    assert "nvidia-smi" in code_lines(gpu) and "nvidia-smi" not in code_lines(cpu) and "--gpus" not in code_lines(cpu)
    assert cpu.replace(cpu[cpu.index("# --- 4."):cpu.index("# --- 5.")], "") == gpu.replace(gpu[gpu.index("# --- 4."):gpu.index("# --- 5.")], "")
    with pytest.raises(ValueError, match="no '# --- 4. the GPU'"):
        cpu_startup_script("#!/bin/bash\necho hi\n")


# -- gke: a pod with no GPU at all --------------------------------------------------------------------


def test_gke_step_pod_asks_for_cpus_only():
    backend = get_backend("gke", {"project_id": "p", "location": "us-central1", "cluster_name": "c", "image": "img:1",
                                  "step_node_pool": "cpu-pool", "env": {"HF_HOME": "/scratch/hf"}})
    kwargs = backend.step_pod_kwargs(RUN, "inputs", "aifs.inputs", ["--date", RUN.date], {"AIWQ_PASSWORD": SECRET}, 3600)
    resources = kwargs["container_resources"]
    assert resources.requests == {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"}
    assert resources.limits == {"memory": "16Gi"}
    assert kwargs["tolerations"] == [] and kwargs["node_selector"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert kwargs["cmds"] == ["python"] and kwargs["arguments"] == ["-m", "aifs.inputs", "--date", "20250601_0000"]
    assert kwargs["name"] == f"aifs-20250601-0000-{RUN.run_hash}-inputs" and kwargs["active_deadline_seconds"] == 3600
    assert [(e.name, e.value) for e in kwargs["env_vars"]] == [("AIWQ_PASSWORD", SECRET), ("HF_HOME", "/scratch/hf")]
    assert kwargs["labels"]["aifs-step"] == "inputs" and kwargs["on_kill_action"] == "delete_pod"
    assert "nvidia" not in repr(kwargs)
    op = __import__("aifs.orchestration.backends.gke", fromlist=["x"]).member_pod_operator_class()(task_id="probe", **kwargs)
    assert op.container_resources.limits == {"memory": "16Gi"}


# -- the operator: exit codes, secrets ----------------------------------------------------------------


@pytest.mark.parametrize("code, retried", [(20, True), (22, True), (21, False), (24, False), (2, False), (-9, True)])
def test_exit_codes_map_through_aifs_exitcodes(code, retried):
    from aifs.orchestration.steps import classify_step

    retryable, message = classify_step("inputs", code)
    assert retryable is retried and "step inputs failed" in message


def test_secret_env_sources_are_checked_and_read_at_run_time(monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from aifs.orchestration.steps import check_secret_env, resolve_secret_env

    with pytest.raises(ValueError, match="secret_env entries"):
        check_secret_env({"AIWQ_PASSWORD": SECRET})  # a value, not where it is: refused at parse time
    monkeypatch.setenv("AIFS_ENS_AIWQ_PASSWORD", SECRET)
    assert resolve_secret_env({"AIWQ_PASSWORD": "env:AIFS_ENS_AIWQ_PASSWORD"}) == {"AIWQ_PASSWORD": SECRET}
    with pytest.raises(AirflowFailException, match=r"AIWQ_TEAM \(from env:AIFS_ENS_NOT_SET\)"):
        resolve_secret_env({"AIWQ_TEAM": "env:AIFS_ENS_NOT_SET"})
