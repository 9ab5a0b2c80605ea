"""gke backend: the member pod GKEStartPodOperator would create, field by field, and its exit-code handling."""

from __future__ import annotations

import dataclasses
import types
from unittest import mock

import pytest
from kubernetes.client import models as k8s

from aifs.orchestration.backends import RunInfo, WorkerSettings, get_backend
from aifs.orchestration.backends.base import BadSettings

RUN = RunInfo(dag_id="aifs_ens_forecast", run_id="scheduled__2025-06-01T00:00:00+00:00", date="20250601_0000")
WORKER = WorkerSettings(bucket="ens-bucket", checkpoint="/scratch/aifs-ens-1.0.ckpt", num_chunks=16)
IMAGE = "us-docker.pkg.dev/ens-project/aifs/worker:1.0"
BASE = {"project_id": "ens-project", "location": "us-central1", "cluster_name": "ens-gpu", "image": IMAGE}


def gke(**overrides):
    return get_backend("gke", {**BASE, **overrides})


def context(map_index=6, try_number=1):
    ti = types.SimpleNamespace(dag_id=RUN.dag_id, task_id="run_member", map_index=map_index, try_number=try_number)
    return {"ti": ti, "run_id": RUN.run_id, "dag": types.SimpleNamespace(dag_id=RUN.dag_id)}


def render(backend, member=7, **ctx):
    op = backend.pod_operator(RUN, member, WORKER, timeout_s=4 * 3600)
    op.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False)  # no cluster to ask here
    return op, op.build_pod_request_obj(context(**ctx))


def test_member_pod_spec_field_by_field():
    backend = gke(namespace="aifs", node_pool="a100-pool", env={"GOOGLE_CLOUD_PROJECT": "ens-project"},
                  service_account_name="aifs-worker", cpu="11", memory="160Gi", scratch_size="80Gi")
    op, pod = render(backend)

    assert pod.metadata.namespace == "aifs"
    assert pod.metadata.name.startswith("aifs-20250601-0000-9bf55e-m007-")  # job name (date, run hash) + random suffix
    labels = pod.metadata.labels
    assert {k: labels[k] for k in ("app", "aifs-date", "aifs-run", "aifs-member", "dag_id", "task_id", "map_index", "try_number")} == {
        "app": "aifs-ens", "aifs-date": "20250601-0000", "aifs-run": "9bf55e", "aifs-member": "007", "dag_id": "aifs_ens_forecast",
        "task_id": "run_member", "map_index": "6", "try_number": "1",
    }  # the task-instance labels are what a retry's re-attach searches for

    spec = pod.spec
    assert spec.restart_policy == "Never"
    assert spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb",
                                  "cloud.google.com/gke-nodepool": "a100-pool"}
    assert [t.to_dict() for t in spec.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule", "value": None, "toleration_seconds": None}
    ]
    assert spec.service_account_name == "aifs-worker"
    assert spec.active_deadline_seconds == 4 * 3600  # the deployment's member_timeout, counted by Kubernetes from the pod's start
    assert [v.to_dict()["empty_dir"] for v in spec.volumes] == [
        {"medium": None, "size_limit": "80Gi"},
        {"medium": "Memory", "size_limit": "16Gi"},  # /dev/shm for the GRIB writers' step ring
    ]

    (container,) = spec.containers
    assert container.name == "base"
    assert container.image == IMAGE
    assert container.image_pull_policy == "IfNotPresent"
    assert container.command == ["python"]
    assert container.args == ["-m", "aifs.worker", "--date", "20250601_0000", "--members", "7", "--bucket", "ens-bucket",
                              "--checkpoint", "/scratch/aifs-ens-1.0.ckpt", "--lead-time", "792",
                              "--upload-threads", "5", "--num-chunks", "16"]
    assert [(e.name, e.value) for e in container.env] == [("GOOGLE_CLOUD_PROJECT", "ens-project")]
    assert container.resources.limits == {"memory": "160Gi", "nvidia.com/gpu": "1"}
    assert container.resources.requests == {"cpu": "11", "memory": "160Gi", "ephemeral-storage": "80Gi", "nvidia.com/gpu": "1"}
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("scratch", "/scratch"), ("dshm", "/dev/shm")]


def test_each_generation_gets_its_own_image_in_the_pod():
    """``images`` names v1's image; ``image`` runs every generation it does not name (here v2)."""
    v1_image = "us-docker.pkg.dev/ens-project/aifs/worker:v1"
    backend = gke(images={"v1": v1_image})
    for generation, image in (("v1", v1_image), ("v2", IMAGE)):
        run = dataclasses.replace(RUN, generation=generation)
        op = backend.pod_operator(run, 7, WORKER, timeout_s=3600)
        op.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False)
        pod = op.build_pod_request_obj(context())
        (container,) = pod.spec.containers
        assert container.image == image
        assert pod.metadata.labels["aifs-generation"] == generation
        assert container.args[:4] == ["-m", "aifs.worker", "--date", "20250601_0000"]
        assert backend.environment_for(generation) == f"worker image {image}"
    # a run checked before generations existed: the one image, as before
    op, pod = render(backend)
    assert pod.spec.containers[0].image == IMAGE and "aifs-generation" not in pod.metadata.labels
    with pytest.raises(BadSettings, match="images"):
        gke(images={"v9": "x"})


def test_operator_reattaches_streams_logs_and_deletes_pods():
    op = gke(startup_timeout=900).pod_operator(RUN, 1, WORKER)
    assert op.reattach_on_restart is True
    assert op.get_logs is True
    assert str(op.on_finish_action.value) == "delete_pod"
    assert op.deferrable is False
    assert op.startup_timeout_seconds == 900
    assert (op.project_id, op.location, op.cluster_name) == ("ens-project", "us-central1", "ens-gpu")


def test_spot_and_more_gpus_per_member():
    _, pod = render(gke(spot=True, gpus_per_member=2, gpu_type="nvidia-l4"))
    assert pod.spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-spot": "true"}
    assert [(t.key, t.operator, t.value) for t in pod.spec.tolerations] == [
        ("nvidia.com/gpu", "Exists", None), ("cloud.google.com/gke-spot", "Equal", "true")]
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"


def test_parallel_gpus_setting():
    assert gke().settings["parallel_gpus"] == 1
    assert gke(parallel_gpus=4).settings["parallel_gpus"] == 4
    with pytest.raises(BadSettings, match="parallel_gpus"):
        gke(parallel_gpus=0)
    with pytest.raises(BadSettings, match="cluster_name"):
        get_backend("gke", {"project_id": "p", "location": "l", "image": IMAGE})


def finished_pod(phase: str, exit_code: int | None) -> k8s.V1Pod:
    statuses = None
    if exit_code is not None:
        statuses = [k8s.V1ContainerStatus(
            name="base", image=IMAGE, image_id="sha256:x", ready=False, restart_count=0,
            state=k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=exit_code)))]
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="aifs-20250601-0000-m007-abc", namespace="default", labels={}),
                     status=k8s.V1PodStatus(phase=phase, container_statuses=statuses))


@pytest.mark.parametrize(("phase", "code"), [("Succeeded", 0), ("Failed", 13)])
def test_exit_code_is_kept_and_the_pod_is_deleted(phase, code):
    op = gke().pod_operator(RUN, 7, WORKER)
    op.__dict__["client"] = client = mock.MagicMock()
    pod = finished_pod(phase, code)
    op.cleanup(pod=pod, remote_pod=pod, context=context())  # a non-zero member is not an operator failure
    assert op.aifs_exit_code == code
    client.delete_namespaced_pod.assert_called_once()
    assert client.delete_namespaced_pod.call_args.args[:2] == ("aifs-20250601-0000-m007-abc", "default")


def test_a_pod_that_never_ran_is_a_backend_failure():
    op = gke().pod_operator(RUN, 7, WORKER)
    op.__dict__["client"] = mock.MagicMock()
    pod = finished_pod("Failed", None)
    with pytest.raises(Exception, match="returned a failure"):
        op.cleanup(pod=pod, remote_pod=pod, context=context())


def test_run_member_returns_the_worker_exit_code():
    backend = gke()
    from aifs.orchestration.backends.gke import member_pod_operator_class

    def execute(self, ctx):
        assert ctx["ti"].task_id == "run_member"
        self.__dict__["client"] = mock.MagicMock()
        pod = finished_pod("Failed", 10)
        self.cleanup(pod=pod, remote_pod=pod, context=ctx)

    log = []
    with mock.patch("airflow.sdk.get_current_context", return_value=context()), \
            mock.patch.object(member_pod_operator_class(), "execute", execute):
        assert backend.run_member(RUN, 7, WORKER, log.append) == 10
    assert log[-1] == "[aifs] member 007 pod finished with exit code 10"


# -- the DAG's gke member task: the provider's pod operator itself, mapped ---------------------------


def gke_member_task(backend, **kwargs):
    from aifs.orchestration.member_task import gke_run_member_operator_class

    class Op(gke_run_member_operator_class()):
        def make_backend(self, config=None):
            return backend

    config = {"dag_id": RUN.dag_id, "run_id": RUN.run_id, "date": RUN.date, "backend": "gke", "members": [7],
              "checkpoint": WORKER.checkpoint, "worker": dataclasses.asdict(WORKER)}
    return Op(task_id="run_member", config=config, member=7, member_timeout_s=3 * 3600, **kwargs)


def test_the_member_task_is_the_providers_pod_operator_and_its_on_kill_deletes_the_pod():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator

    op = gke_member_task(gke(namespace="aifs"))
    assert isinstance(op, GKEStartPodOperator)
    assert type(op).on_kill is KubernetesPodOperator.on_kill  # killing the task is the provider's business
    assert str(op.on_kill_action.value) == "delete_pod"
    assert op.log_pod_spec_on_failure is False  # a failed pod's spec would put the env values (secrets) in the log
    op.__dict__["client"] = client = mock.MagicMock()
    op.pod = finished_pod("Running", None)
    op.on_kill()
    client.delete_namespaced_pod.assert_called_once_with(name="aifs-20250601-0000-m007-abc", namespace="default")


def test_the_member_task_sends_the_exact_pod_request_and_maps_the_exit_code():
    op = gke_member_task(gke(namespace="aifs"))
    op.__dict__["hook"] = types.SimpleNamespace(is_in_cluster=False)
    sent = []

    def provider_execute(self, ctx):  # the provider's execute, down to the pod it would create
        sent.append(self.build_pod_request_obj(ctx))
        self.__dict__["client"] = mock.MagicMock()
        pod = finished_pod("Failed", 13)
        self.cleanup(pod=pod, remote_pod=pod, context=ctx)

    pushed = {}
    ti = types.SimpleNamespace(dag_id=RUN.dag_id, task_id="run_member", map_index=6, try_number=1,
                               xcom_pull=lambda **kw: None, xcom_push=lambda key, value: pushed.__setitem__(key, value))
    ctx = {"ti": ti, "run_id": RUN.run_id, "dag": types.SimpleNamespace(dag_id=RUN.dag_id)}
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator

    with mock.patch.object(GKEStartPodOperator, "execute", provider_execute):
        with pytest.raises(Exception, match="exit 13"):
            op.execute(ctx)
    (pod,) = sent
    assert pod.metadata.name.startswith("aifs-20250601-0000-9bf55e-m007-") and pod.metadata.namespace == "aifs"
    assert pod.metadata.labels["aifs-run"] == "9bf55e" and pod.metadata.labels["map_index"] == "6"
    assert pod.spec.active_deadline_seconds == 3 * 3600
    assert pod.spec.containers[0].args == ["-m", "aifs.worker", *WORKER.worker_args(RUN.date, 7)]
    assert pushed["outcome"]["exit_code"] == 13


def test_a_member_of_a_run_whose_checkpoint_failed_starts_no_pod():
    from airflow.sdk.exceptions import AirflowSkipException

    op = gke_member_task(gke())
    failed = {"member": 1, "map_index": 0, "checkpoint": WORKER.checkpoint, "run_id": RUN.run_id}
    ti = types.SimpleNamespace(map_index=6, try_number=1, xcom_pull=lambda **kw: [None, failed] if kw.get("key") == "checkpoint_failed" else None,
                               xcom_push=mock.MagicMock())
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator

    with mock.patch.object(GKEStartPodOperator, "execute") as provider_execute:
        with pytest.raises(AirflowSkipException, match="member 001 of this run .* could not load the checkpoint"):
            op.execute({"ti": ti})
    provider_execute.assert_not_called()
