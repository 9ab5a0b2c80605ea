"""``gke`` backend: one GPU pod per member on a GKE cluster whose GPU node pool autoscales.

No VM to create or delete: the node-pool autoscaler brings a GPU node up when a member's pod asks
for one and takes it away when idle. Each member is a pod started by the Google provider's
GKEStartPodOperator (a KubernetesPodOperator) with an ``nvidia.com/gpu`` limit, the GPU taint's
toleration and a node selector for the GPU type (and optionally node pool / spot). Logs stream to
the task log, the pod is deleted when it ends, and a retried task re-attaches to the pod its
predecessor left running (``reattach_on_restart``; called ``durable`` from Airflow 3.3), found by
the task instance's labels. A pod that already ended is deleted and started again (the worker skips
a member whose completion manifest exists).

In the DAG the member task *is* that pod operator (aifs.orchestration.member_task, mapped over the
members), so killing the task (timeout, mark failed, clear) deletes the pod by the provider's own
``on_kill``. The pod's ``activeDeadlineSeconds`` is the deployment's member timeout: Kubernetes
stops the pod that long after its start, whatever happens to Airflow. Pod names and labels carry
the date and the run's hash (``aifs-run``).

``parallel_gpus`` (default 1) is how many members may run at once: the DAG uses it for the
run_member task's ``max_active_tis_per_dagrun``. With quota for N GPUs, members finish N times
sooner at the same cost per member.
"""

from __future__ import annotations

import functools
from typing import Any

from aifs import hostcontract
from aifs.orchestration.backends.base import (
    HostBackend, LogSink, RunInfo, WorkerSettings, env_setting_schema, per_generation_schema, register, require_image,
)

GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
SPOT_LABEL = "cloud.google.com/gke-spot"
SCRATCH_VOLUME = "scratch"
SHM_VOLUME = "dshm"


def _base_exit_code(remote_pod: Any, container: str) -> int | None:
    statuses = (remote_pod.status.container_statuses if remote_pod is not None and remote_pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state and status.state.terminated:
            return int(status.state.terminated.exit_code)
    return None


@functools.lru_cache(maxsize=1)
def member_pod_operator_class():
    """GKEStartPodOperator that keeps the worker container's exit code instead of only raising."""
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator

    class MemberPodOperator(GKEStartPodOperator):
        aifs_exit_code: int | None = None

        def cleanup(self, pod, remote_pod, xcom_result=None, context=None):
            self.aifs_exit_code = _base_exit_code(remote_pod, self.base_container_name)
            try:
                super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
            except Exception:
                # A member that exited non-zero is not a backend failure: run_member returns the code
                # and the DAG maps it. Anything else (pod never ran, API errors) propagates.
                if not self.aifs_exit_code:
                    raise
                self.log.info("worker exited with %s; the pod was cleaned up", self.aifs_exit_code)

    return MemberPodOperator


@register("gke")
class GKEBackend(HostBackend):
    SETTINGS_SCHEMA = {
        "type": "object",
        "required": ["project_id", "location", "cluster_name", "image"],
        "properties": {
            "project_id": {"type": "string", "minLength": 1},
            "location": {"type": "string", "minLength": 1, "description": "cluster region or zone"},
            "cluster_name": {"type": "string", "minLength": 1},
            "image": {"type": "string", "minLength": 1, "description": "worker image (of every generation 'images' does not name)"},
            "images": per_generation_schema("worker image"),
            "entrypoint": {"type": "array", "items": {"type": "string"}, "default": ["python", "-m", "aifs.worker"]},
            "namespace": {"type": "string", "default": "default"},
            "gpu_type": {"type": "string", "default": "nvidia-a100-80gb",
                         "description": "value of the cloud.google.com/gke-accelerator node label"},
            "gpus_per_member": {"type": "integer", "minimum": 1, "default": 1},
            "parallel_gpus": {"type": "integer", "minimum": 1, "default": 1,
                              "description": "members running at once (the DAG's max_active_tis_per_dagrun)"},
            "node_pool": {"type": ["string", "null"], "default": None},
            "spot": {"type": "boolean", "default": False},
            "cpu": {"type": "string", "default": "8"},
            "memory": {"type": "string", "default": "64Gi"},
            "scratch_size": {"type": "string", "default": "60Gi",
                             "description": "emptyDir at /scratch: input + windows in flight (~16 GB a member if held whole)"},
            "env": env_setting_schema("extra environment variables for the worker container"),
            "service_account_name": {"type": ["string", "null"], "default": None,
                                     "description": "Kubernetes service account (Workload Identity for GCS)"},
            "image_pull_policy": {"enum": ["Always", "IfNotPresent", "Never"], "default": "IfNotPresent"},
            "startup_timeout": {"type": "integer", "minimum": 1, "default": 1800,
                                "description": "seconds for the autoscaler to bring a GPU node and the pod to start"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "default": {}},
            "gcp_conn_id": {"type": "string", "default": "google_cloud_default"},
            "impersonation_chain": {"type": ["string", "null"], "default": None},
            "use_internal_ip": {"type": "boolean", "default": False},
            "use_dns_endpoint": {"type": "boolean", "default": False},
            # CPU steps (inputs, products): a pod without GPU on the cluster's CPU nodes
            "step_cpu": {"type": "string", "default": "4", "description": "CPU steps: the pod's CPU request"},
            "step_memory": {"type": "string", "default": "16Gi", "description": "CPU steps: the pod's memory request and limit"},
            "step_scratch_size": {"type": "string", "default": "20Gi", "description": "CPU steps: emptyDir at /scratch"},
            "step_node_pool": {"type": ["string", "null"], "default": None,
                               "description": "CPU steps: node pool to run on (null: wherever a CPU node has room)"},
        },
        "additionalProperties": False,
    }

    def pod_kwargs(self, timeout_s: float | None = None) -> dict[str, Any]:
        """GKEStartPodOperator arguments that are the same for every member of every run.

        ``timeout_s`` (the deployment's member_timeout) becomes the pod's ``activeDeadlineSeconds``:
        Kubernetes counts it from the pod's start and stops the pod itself, so a re-attaching retry
        does not restart it and a vanished Airflow cannot extend it.
        """
        from kubernetes.client import models as k8s

        s = self.settings
        gpus = str(s["gpus_per_member"])
        node_selector = {ACCELERATOR_LABEL: s["gpu_type"]}
        tolerations = [k8s.V1Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")]
        if s["node_pool"]:
            node_selector[NODEPOOL_LABEL] = s["node_pool"]
        if s["spot"]:
            node_selector[SPOT_LABEL] = "true"
            tolerations.append(k8s.V1Toleration(key=SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule"))
        resources = k8s.V1ResourceRequirements(
            requests={"cpu": s["cpu"], "memory": s["memory"], "ephemeral-storage": s["scratch_size"], GPU_RESOURCE: gpus},
            limits={"memory": s["memory"], GPU_RESOURCE: gpus},
        )
        entry = list(s["entrypoint"])
        from airflow.providers.cncf.kubernetes.version_compat import AIRFLOW_V_3_3_PLUS

        reattach = {"durable": True} if AIRFLOW_V_3_3_PLUS else {"reattach_on_restart": True}
        return dict(
            project_id=s["project_id"],
            location=s["location"],
            cluster_name=s["cluster_name"],
            use_internal_ip=s["use_internal_ip"],
            use_dns_endpoint=s["use_dns_endpoint"],
            gcp_conn_id=s["gcp_conn_id"],
            impersonation_chain=s["impersonation_chain"],
            namespace=s["namespace"],
            name="aifs-member",  # each member's own name is set when it runs (member_pod_fields)
            random_name_suffix=True,
            image=s["image"],
            image_pull_policy=s["image_pull_policy"],
            cmds=entry[:1],
            arguments=[],
            container_resources=resources,
            node_selector=node_selector,
            tolerations=tolerations,
            volumes=[
                k8s.V1Volume(name=SCRATCH_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=s["scratch_size"])),
                # the GRIB writers' step ring lives in /dev/shm; a pod's own is 64 MB
                k8s.V1Volume(name=SHM_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=f"{hostcontract.WORKER_SHM_GIB}Gi")),
            ],
            volume_mounts=[
                k8s.V1VolumeMount(name=SCRATCH_VOLUME, mount_path=hostcontract.CONTAINER_SCRATCH),
                k8s.V1VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"),
            ],
            service_account_name=s["service_account_name"],
            startup_timeout_seconds=s["startup_timeout"],
            active_deadline_seconds=int(-(-timeout_s // 1)) if timeout_s else None,
            get_logs=True,
            on_finish_action="delete_pod",
            on_kill_action="delete_pod",
            log_events_on_failure=True,
            log_pod_spec_on_failure=False,  # the spec holds the env values (deployment secrets)
            deferrable=False,
            **reattach,
        )

    def member_pod_fields(self, run: RunInfo, member: int, worker: WorkerSettings) -> dict[str, Any]:
        """What differs per member and run: the pod's name, the worker's arguments, the labels; and the env.

        The env is set here, when the member runs, not with the operator's static arguments:
        ``env_vars`` is a template field, and Airflow stores a task's rendered template fields where
        every viewer of the run can read them; env values may be secret.
        """
        from kubernetes.client import models as k8s

        entry = list(self.settings["entrypoint"])
        return {
            "env_vars": [k8s.V1EnvVar(name=str(k), value=str(v)) for k, v in sorted(self.settings["env"].items())],
            "image": require_image("gke", self.settings, run.generation),  # the run's checkpoint generation's
            "name": run.job_name(member),
            "arguments": entry[1:] + worker.worker_args(run.date, member),
            "labels": {"app": "aifs-ens", "aifs-date": run.date.replace("_", "-"), "aifs-run": run.run_hash,
                       "aifs-member": f"{member:03d}", **({"aifs-generation": run.generation} if run.generation else {}),
                       **self.settings["labels"]},
        }

    def pod_operator(self, run: RunInfo, member: int, worker: WorkerSettings, timeout_s: float | None = None):
        """The operator that runs one member outside a DAG (also what the tests render)."""
        return member_pod_operator_class()(
            task_id=f"aifs_member_{member:03d}", **{**self.pod_kwargs(timeout_s), **self.member_pod_fields(run, member, worker)}
        )

    def step_pod_kwargs(self, run: RunInfo, step: str, module: str, args, env: dict[str, str],
                        timeout_s: float | None = None) -> dict[str, Any]:
        """A CPU step's pod: the members' pod (image, cluster, account, deadline, re-attach, logs) without any GPU.

        No ``nvidia.com/gpu`` request or limit, no GPU toleration, no accelerator node selector: the
        scheduler puts it on a CPU node and the GPU pool's autoscaler never wakes for it. ``env``
        (secrets) is set here, when the step runs, never as an operator argument a DAG renders.
        """
        from kubernetes.client import models as k8s

        from aifs.orchestration.backends.base import check_step

        check_step(step, module)
        s = self.settings
        kwargs = self.pod_kwargs(timeout_s)
        entry = list(s["entrypoint"])
        merged = {**{str(k): str(v) for k, v in s["env"].items()}, **{str(k): str(v) for k, v in env.items()}}
        kwargs.update(
            name=run.step_job_name(step),
            arguments=["-m", module, *map(str, args)],
            cmds=entry[:1],
            container_resources=k8s.V1ResourceRequirements(
                requests={"cpu": s["step_cpu"], "memory": s["step_memory"], "ephemeral-storage": s["step_scratch_size"]},
                limits={"memory": s["step_memory"]},
            ),
            node_selector={NODEPOOL_LABEL: s["step_node_pool"]} if s["step_node_pool"] else {},
            tolerations=[],
            volumes=[k8s.V1Volume(name=SCRATCH_VOLUME, empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=s["step_scratch_size"]))],
            volume_mounts=[k8s.V1VolumeMount(name=SCRATCH_VOLUME, mount_path=hostcontract.CONTAINER_SCRATCH)],
            env_vars=[k8s.V1EnvVar(name=k, value=v) for k, v in sorted(merged.items())],
            labels={"app": "aifs-ens", "aifs-date": run.date.replace("_", "-"), "aifs-run": run.run_hash,
                    "aifs-step": step, **s["labels"]},
        )
        return kwargs

    def run_step(self, run: RunInfo, step: str, module: str, args, env: dict[str, str], log: LogSink, *,
                 timeout_s: float | None = None) -> int:
        """The step as a CPU pod (the provider's pod operator: logs, re-attach, delete when done)."""
        from airflow.sdk import get_current_context

        self._step_pod = member_pod_operator_class()(
            task_id=f"aifs_step_{step}", **self.step_pod_kwargs(run, step, module, args, env, timeout_s))
        log(f"[aifs] starting CPU pod {run.step_job_name(step)}-* on {self.settings['cluster_name']} (no GPU)")
        self._step_pod.execute(get_current_context())
        code = 0 if self._step_pod.aifs_exit_code is None else self._step_pod.aifs_exit_code
        log(f"[aifs] step {step} pod finished with exit code {code}")
        return code

    def stop_step(self, run: RunInfo, step: str, log: LogSink) -> None:
        """The task was killed: the provider's on_kill deletes the pod it started."""
        pod = getattr(self, "_step_pod", None)
        if pod is not None:
            pod.on_kill()

    def environment_for(self, generation: str | None) -> str:
        return f"worker image {require_image('gke', self.settings, generation)}"

    def create_host(self, run: RunInfo, log: LogSink) -> dict[str, Any]:
        s = self.settings
        log(f"[aifs] gke backend: pods on cluster {s['cluster_name']} ({s['location']}); the GPU node pool's "
            "autoscaler provides the GPUs, nothing to create")
        return {"backend": "gke", "cluster": s["cluster_name"], "location": s["location"], "parallel_gpus": s["parallel_gpus"]}

    def run_member(self, run: RunInfo, member: int, worker: WorkerSettings, log: LogSink, *,
                   timeout_s: float | None = None) -> int:
        """Outside the DAG only: the DAG's gke member task is the pod operator itself
        (aifs.orchestration.member_task), so that its on_kill and re-attach are the provider's."""
        from airflow.sdk import get_current_context

        op = self.pod_operator(run, member, worker, timeout_s)
        log(f"[aifs] starting pod {run.job_name(member)}-* on {self.settings['cluster_name']} "
            f"({self.settings['gpus_per_member']}x {self.settings['gpu_type']})")
        op.execute(get_current_context())
        code = 0 if op.aifs_exit_code is None else op.aifs_exit_code
        log(f"[aifs] member {member:03d} pod finished with exit code {code}")
        return code

    def delete_host(self, run: RunInfo, log: LogSink) -> None:
        log("[aifs] gke backend: member pods are deleted as they finish; nothing to delete")
