"""``gce`` backend: one Compute Engine GPU VM per DAG run, members as detached jobs over OS Login + IAP.

* ``create_host`` (setup task) creates the VM through the Google provider's ComputeEngineHook (the
  same client calls as ComputeEngineInsertInstanceOperator) if it does not exist, then waits until
  it is ready: SSH answers, the startup script wrote hostcontract.READY_MARKER (or FAILED_MARKER:
  fail at once with its reason), ``nvidia-smi`` answers and the worker image is present.
* ``run_member`` reaches the VM with ComputeEngineSSHHook and runs the worker container as a
  detached job (remote_job.py). If the VM is gone (spot VM reclaimed, ``max_run_duration`` expired,
  someone deleted it) it is created again on the same idempotent path as setup; if it disappears
  while a member runs, the task fails with HostGone and its retry recreates it.
* ``delete_host`` deletes the VM; "already gone" is success, and it is safe on a half-created VM.

Safety nets so that a lost scheduler can never leave a GPU billing: ``max_run_duration`` with
``instance_termination_action: DELETE`` (the VM deletes itself after ``max_run_hours``), no
automatic restart, and spot provisioning as an option. The VM has no public IP (SSH goes through
IAP; the subnet needs Private Google Access or Cloud NAT to pull the image and reach GCS) and runs
as a dedicated service account.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aifs import hostcontract
from aifs.orchestration.backends import remote_job
from aifs.orchestration.backends.base import HostBackend, LogSink, RunInfo, WorkerSettings, register, require_image
from aifs.orchestration.backends.ssh import new_remote_job, open_ssh_client, run_remote_member, stop_remote_member

#: GPU presets: accelerator-optimized machine types come with their GPU attached.
GPU_MACHINE_TYPES = {
    "a100-80gb": "a2-ultragpu-1g",  # 1x A100 80 GB, 12 vCPU, 170 GB RAM: the reference set-up
    "a100-40gb": "a2-highgpu-1g",  # 1x A100 40 GB: needs precision 16 / num_chunks
    "h100": "a3-highgpu-1g",  # 1x H100 80 GB
    "l4": "g2-standard-16",  # 1x L4 24 GB, 64 GB RAM: needs precision 16 and num_chunks
}
DEFAULT_BOOT_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu128-ubuntu-2204-nvidia-570"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
#: Instance states after which the VM will not run members again without a restart: replace it.
DEAD_STATES = {"STOPPING", "STOPPED", "TERMINATED", "SUSPENDING", "SUSPENDED"}


class HostGone(remote_job.RemoteJobError):
    """The VM disappeared while a member ran (spot reclaim, max_run_duration); a retry recreates it."""


def label_value(text: str) -> str:
    """A GCE label value: lowercase letters, digits, ``_`` and ``-``, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]+", "-", str(text).lower()).strip("-")[:63]


def find_startup_script() -> Path:
    """The VM startup script shipped with the package: include/startup-script.sh (repo checkout or package)."""
    here = Path(__file__).resolve()
    candidates = [
        here.parents[4] / "include" / "startup-script.sh",  # repo: plugins/aifs/orchestration/backends/gce.py
        here.parents[2] / "include" / "startup-script.sh",  # packaged next to the aifs package
        # Cloud Composer syncs only dags/, plugins/ and data/ from its bucket; the operator's guide
        # uploads the script to data/, which Composer mounts here
        Path("/home/airflow/gcs/data/startup-script.sh"),
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "VM startup script not found (looked in " + ", ".join(map(str, candidates)) + "); set the gce "
        "backend's 'startup_script' or 'startup_script_path' setting"
    )


@register("gce")
class GCEBackend(HostBackend):
    SETTINGS_SCHEMA = {
        "type": "object",
        "required": ["project_id", "zone", "service_account", "image"],
        "properties": {
            "project_id": {"type": "string", "minLength": 1},
            "zone": {"type": "string", "minLength": 1, "description": "e.g. us-central1-a"},
            "service_account": {"type": "string", "minLength": 1,
                                "description": "dedicated service account e-mail the VM runs as"},
            "gpu": {"enum": sorted(GPU_MACHINE_TYPES), "default": "a100-80gb"},
            "machine_type": {"type": ["string", "null"], "default": None, "description": "overrides 'gpu'"},
            "accelerator_type": {"type": ["string", "null"], "default": None,
                                 "description": "N1 machine types only: e.g. nvidia-tesla-t4 (attached as guest accelerator)"},
            "accelerator_count": {"type": "integer", "minimum": 1, "default": 1},
            "spot": {"type": "boolean", "default": False},
            "max_run_hours": {"type": "number", "exclusiveMinimum": 0, "default": 12,
                              "description": "the VM deletes itself after this long, whatever happens to Airflow"},
            "boot_image": {"type": "string", "default": DEFAULT_BOOT_IMAGE,
                           "description": "image with NVIDIA drivers and Docker (+ NVIDIA container toolkit)"},
            "boot_disk_gb": {"type": "integer", "minimum": 50, "default": 150,
                             "description": "image (~15 GB) + checkpoint + one member in flight (input + 2 windows, ~16 GB if held whole)"},
            "boot_disk_type": {"type": "string", "default": "pd-balanced"},
            "network": {"type": "string", "default": "global/networks/default"},
            "subnetwork": {"type": ["string", "null"], "default": None},
            "network_tags": {"type": "array", "items": {"type": "string"}, "default": []},
            # no fixed instance name: host settings are the deployment's, and one name for every run
            # would let two runs share, then delete, one VM
            "name_prefix": {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,40})$", "default": "aifs-ens",
                            "description": "VMs are named {name_prefix}-{date}-{run hash}: one VM per DAG run"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
            "startup_script": {"type": ["string", "null"], "default": None, "description": "inline startup script"},
            "startup_script_path": {"type": ["string", "null"], "default": None},
            "gcp_conn_id": {"type": "string", "default": "google_cloud_default"},
            "impersonation_chain": {"type": ["string", "null"], "default": None},
            "use_oslogin": {"type": "boolean", "default": True},
            "use_iap_tunnel": {"type": "boolean", "default": True},
            "ssh_user": {"type": "string", "default": "aifs", "description": "user for metadata SSH keys (use_oslogin false)"},
            "step_machine_type": {"type": "string", "default": "n2-standard-8",
                                  "description": "CPU steps (inputs, products): the machine type of the CPU VM made for each step"},
            **remote_job.job_settings_properties(
                launch="container",
                sudo=True,
                ready_marker=hostcontract.READY_MARKER,
                failed_marker=hostcontract.FAILED_MARKER,
                ready_timeout=1200,
            ),
        },
        "additionalProperties": False,
    }

    # -- naming and the instance body ---------------------------------------------------------

    def instance_name(self, run: RunInfo) -> str:
        return f"{self.settings['name_prefix']}-{run.slug}"

    def machine_type(self) -> str:
        return self.settings["machine_type"] or GPU_MACHINE_TYPES[self.settings["gpu"]]

    def startup_script(self) -> str:
        if self.settings["startup_script"]:
            return self.settings["startup_script"]
        path = Path(self.settings["startup_script_path"]) if self.settings["startup_script_path"] else find_startup_script()
        return path.read_text()

    def instance_body(self, run: RunInfo) -> dict[str, Any]:
        """The ``instance_resource`` handed to ComputeEngineHook.insert_instance (snake_case proto keys)."""
        s, zone = self.settings, self.settings["zone"]
        interface: dict[str, Any] = {"network": s["network"]}  # no access_configs: no public IP
        if s["subnetwork"]:
            interface["subnetwork"] = s["subnetwork"]
        scheduling: dict[str, Any] = {
            "on_host_maintenance": "TERMINATE",  # GPUs cannot live-migrate
            "automatic_restart": False,
            "provisioning_model": "SPOT" if s["spot"] else "STANDARD",
            "instance_termination_action": "DELETE",
            "max_run_duration": {"seconds": int(round(s["max_run_hours"] * 3600))},
        }
        metadata = [
            {"key": "startup-script", "value": self.startup_script()},
            # the image of the run's checkpoint generation: the startup script pulls it
            {"key": hostcontract.METADATA_WORKER_IMAGE, "value": require_image("gce", s, run.generation)},
        ]
        if s["use_oslogin"]:
            metadata.insert(0, {"key": "enable-oslogin", "value": "TRUE"})
        labels = {
            "app": "aifs-ens",
            "dag": label_value(run.dag_id),
            "run": label_value(run.run_id),
            "date": label_value(run.date.replace("_", "-")),
            "run-hash": run.run_hash,
            **({"generation": label_value(run.generation)} if run.generation else {}),
            **{label_value(k): label_value(v) for k, v in s["labels"].items()},
        }
        body: dict[str, Any] = {
            "name": self.instance_name(run),
            "machine_type": f"zones/{zone}/machineTypes/{self.machine_type()}",
            "disks": [
                {
                    "boot": True,
                    "auto_delete": True,
                    "initialize_params": {
                        "source_image": s["boot_image"],
                        "disk_size_gb": s["boot_disk_gb"],
                        "disk_type": f"zones/{zone}/diskTypes/{s['boot_disk_type']}",
                    },
                }
            ],
            "network_interfaces": [interface],
            "scheduling": scheduling,
            "service_accounts": [{"email": s["service_account"], "scopes": [CLOUD_PLATFORM_SCOPE]}],
            "metadata": {"items": metadata},
            "labels": labels,
        }
        if s["accelerator_type"]:
            body["guest_accelerators"] = [
                {
                    "accelerator_type": f"zones/{zone}/acceleratorTypes/{s['accelerator_type']}",
                    "accelerator_count": s["accelerator_count"],
                }
            ]
        if s["network_tags"]:
            body["tags"] = {"items": list(s["network_tags"])}
        return body

    # -- Compute Engine ---------------------------------------------------------------------------

    def _compute(self):
        from airflow.providers.google.cloud.hooks.compute import ComputeEngineHook

        return ComputeEngineHook(gcp_conn_id=self.settings["gcp_conn_id"], impersonation_chain=self.settings["impersonation_chain"])

    def instance_status(self, run: RunInfo) -> str | None:
        """The VM's status (RUNNING, STAGING, ...) or None when it does not exist."""
        from google.api_core.exceptions import NotFound

        try:
            instance = self._compute().get_instance(
                resource_id=self.instance_name(run), zone=self.settings["zone"], project_id=self.settings["project_id"]
            )
        except NotFound:
            return None
        return str(instance.status)

    def _insert(self, run: RunInfo, log: LogSink) -> None:
        from google.api_core.exceptions import Conflict

        s = self.settings
        name = self.instance_name(run)
        log(f"[aifs] creating VM {name} in {s['zone']} ({self.machine_type()}"
            f"{', spot' if s['spot'] else ''}; deletes itself after {s['max_run_hours']:g} h)")
        try:
            self._compute().insert_instance(body=self.instance_body(run), zone=s["zone"], project_id=s["project_id"])
        except Conflict:  # created meanwhile (another try, a person): same name, same VM
            log(f"[aifs] VM {name} already exists")

    def _delete(self, run: RunInfo, log: LogSink) -> bool:
        from google.api_core.exceptions import NotFound

        name = self.instance_name(run)
        try:
            self._compute().delete_instance(resource_id=name, zone=self.settings["zone"], project_id=self.settings["project_id"])
        except NotFound:
            log(f"[aifs] VM {name} is already gone")
            return False
        log(f"[aifs] deleted VM {name}")
        return True

    def ensure_vm(self, run: RunInfo, log: LogSink, wait_ready: bool = True) -> bool:
        """Make the VM exist and be ready; True when it had to be created. Idempotent."""
        name = self.instance_name(run)
        status = self.instance_status(run)
        if status in DEAD_STATES:
            log(f"[aifs] VM {name} is {status} (preempted or stopped): replacing it")
            self._delete(run, log)
            status = None
        created = status is None
        if created:
            self._insert(run, log)
        else:
            log(f"[aifs] VM {name} exists ({status})")
        if created or wait_ready:
            remote_job.wait_until_ready(lambda: self._connect(run), self.settings_for(run.generation), log, f"VM {name}")
        return created

    # -- SSH ------------------------------------------------------------------------------------

    def ssh_hook(self, run: RunInfo, instance: str | None = None):
        from airflow.providers.google.cloud.hooks.compute_ssh import ComputeEngineSSHHook

        s = self.settings
        return ComputeEngineSSHHook(
            gcp_conn_id=s["gcp_conn_id"],
            instance_name=instance or self.instance_name(run),
            zone=s["zone"],
            project_id=s["project_id"],
            user=s["ssh_user"],
            use_oslogin=s["use_oslogin"],
            use_iap_tunnel=s["use_iap_tunnel"],
            use_internal_ip=True,  # no public IP
            impersonation_chain=s["impersonation_chain"],
            max_retries=3,
            cmd_timeout=None,
        )

    def _connect(self, run: RunInfo, instance: str | None = None):
        return open_ssh_client(self.ssh_hook(run, instance), self.settings["keepalive_interval"])

    # -- the interface --------------------------------------------------------------------------

    def environment_for(self, generation: str | None) -> str:
        return f"worker image {require_image('gce', self.settings, generation)}"

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        created = self.ensure_vm(run, log, wait_ready=True)
        s = self.settings
        return {
            "backend": "gce",
            "instance": self.instance_name(run),
            "project_id": s["project_id"],
            "zone": s["zone"],
            "machine_type": self.machine_type(),
            "spot": s["spot"],
            "created": created,
        }

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink, *,
                   timeout_s: float | None = None) -> int:
        name = self.instance_name(run)
        if self.ensure_vm(run, log, wait_ready=False):
            log(f"[aifs] VM {name} was gone (spot reclaim, max_run_duration or deleted) and has been created again")

        def on_session_lost(error: Exception) -> None:
            status = self.instance_status(run)
            if status is None or status in DEAD_STATES:
                raise HostGone(
                    f"VM {name} is {'gone' if status is None else status} while member {member} ran "
                    f"(spot reclaim or max_run_duration); the task's retry creates it again and reruns the member"
                ) from error

        job = new_remote_job(self, lambda: self._connect(run), run, member, log, timeout_s=timeout_s,
                             on_session_lost=on_session_lost)
        return run_remote_member(job, self.settings_for(run.generation), run, member, worker)

    def stop_member(self, run: RunInfo, member: int, log: LogSink) -> None:
        if self.instance_status(run) not in (None, *DEAD_STATES):
            stop_remote_member(new_remote_job(self, lambda: self._connect(run), run, member, log), log)

    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        self._delete(run, log)

    # -- CPU steps: a CPU VM of their own (see cpu_startup_script below) ------------------------

    def run_step(self, run: RunInfo, step: str, module: str, args, env: dict[str, str], log: LogSink, *,
                 timeout_s: float | None = None) -> int:
        """Make the step's CPU VM, run the step there as a detached job, delete the VM whatever happened."""
        from google.api_core.exceptions import Conflict

        from aifs.orchestration.backends.base import check_step
        from aifs.orchestration.backends.ssh import run_remote_step

        check_step(step, module)
        s = self.settings
        name = step_vm_name(self, run, step)
        settings = {**s, "launch": "container", "gpu_check": None}  # a CPU VM: no nvidia-smi to answer
        try:
            log(f"[aifs] creating CPU VM {name} for step {step} ({s['step_machine_type']} in {s['zone']}; no GPU)")
            try:
                self._compute().insert_instance(body=step_instance_body(self, run, step, timeout_s), zone=s["zone"],
                                                project_id=s["project_id"])
            except Conflict:  # a retry, or a try whose task process died: the same VM, adopted
                log(f"[aifs] VM {name} already exists: adopting it")

            def connect():
                return self._connect(run, name)

            remote_job.wait_until_ready(connect, settings, log, f"VM {name}")
            return run_remote_step(settings, connect, run, step, module, args, env, log, timeout_s)
        finally:
            self._delete_step_vm(name, log)

    def stop_step(self, run: RunInfo, step: str, log: LogSink) -> None:
        """The step's task was killed: deleting its VM stops the step (and its bill)."""
        self._delete_step_vm(step_vm_name(self, run, step), log)

    def _delete_step_vm(self, name: str, log: LogSink) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self._compute().delete_instance(resource_id=name, zone=self.settings["zone"], project_id=self.settings["project_id"])
            log(f"[aifs] deleted CPU VM {name}")
        except NotFound:
            log(f"[aifs] CPU VM {name} is already gone")


# -- CPU steps: a CPU VM of their own ---------------------------------------------------------------
#
# A step (building inputs, making products) needs CPUs, not a GPU: running it on the run's GPU VM
# would bill a GPU for it (and there is no GPU VM outside a forecast run). So each step gets a small
# CPU VM, ``{name_prefix}-{date}-{run hash}-{step}`` (``step_machine_type``), made and deleted around
# it: same boot image, network, service account and worker image as the GPU VM, reached the same way
# (OS Login + IAP), the step a detached container job without ``--gpus``. The VM deletes itself
# after the step's timeout plus an hour whatever happens to Airflow (``max_run_duration``), and its
# bootstrap is the GPU VM's startup script less the GPU check (``cpu_startup_script``).

#: Where the GPU check starts and ends in include/startup-script.sh (a CPU VM skips it).
GPU_SECTION_START = "# --- 4. the GPU"
GPU_SECTION_END = "# --- 5. scratch"
#: A step VM outlives its step's deadline by this much at most (time to boot, pull and clean up).
STEP_VM_MARGIN_S = 3600


def cpu_startup_script(gpu_script: str) -> str:
    """The GPU VM's bootstrap without its GPU section: Docker, login, pull, scratch and the ready marker.

    Derived from the one script rather than kept as a second copy, so the two never drift apart.
    """
    start, end = gpu_script.find(GPU_SECTION_START), gpu_script.find(GPU_SECTION_END)
    if start < 0 or end < start:
        raise ValueError(f"the startup script has no {GPU_SECTION_START!r} ... {GPU_SECTION_END!r} section to leave out "
                         "for a CPU step VM; set the gce backend's startup_script to one that has")
    skipped = ('# --- 4. no GPU: a CPU step VM (aifs.orchestration.backends.gce.cpu_startup_script) ----------------\n'
               'gpu="none (CPU step VM)"\nseen="GPU not checked"\n\n')
    return gpu_script[:start] + skipped + gpu_script[end:]


def step_vm_name(backend: GCEBackend, run: RunInfo, step: str) -> str:
    name = f"{backend.settings['name_prefix']}-{run.slug}-{step}"
    if len(name) > 63:
        raise ValueError(f"step VM name {name!r} is longer than Compute Engine's 63 characters: shorten name_prefix")
    return name


def step_instance_body(backend: GCEBackend, run: RunInfo, step: str, timeout_s: float | None) -> dict[str, Any]:
    """The GPU VM's body (network, service account, boot image, image metadata), as a CPU VM for one step."""
    s, zone = backend.settings, backend.settings["zone"]
    body = backend.instance_body(run)
    body.pop("guest_accelerators", None)
    body["name"] = step_vm_name(backend, run, step)
    body["machine_type"] = f"zones/{zone}/machineTypes/{s['step_machine_type']}"
    limit = (timeout_s or s["max_run_hours"] * 3600) + STEP_VM_MARGIN_S
    body["scheduling"] = {
        "on_host_maintenance": "MIGRATE",  # no GPU: it may live-migrate
        "automatic_restart": False,
        "provisioning_model": "STANDARD",  # a step is short and wanted now: no spot reclaim mid-step
        "instance_termination_action": "DELETE",
        "max_run_duration": {"seconds": int(-(-limit // 1))},
    }
    body["labels"] = {**body["labels"], "step": label_value(step)}
    body["metadata"] = {"items": [
        {**item, "value": cpu_startup_script(item["value"])} if item["key"] == "startup-script" else item
        for item in body["metadata"]["items"]
    ]}
    return body
