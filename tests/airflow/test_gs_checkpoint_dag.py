"""A deployment whose checkpoint is ``gs://bucket/object``, end to end under ``dag.test()``.

choose_environment reads its metadata from the bucket (ranged reads); the worker, on the local
backend, fetches it into its cache with its own credentials and runs the member; the manifest
records the sha256 that AIFS_ENS_CHECKPOINTS declares, so plan and verify compare contents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import FORECAST_DAY, TEST_CHECKPOINTS, load_dag, local_deployment, run_conf, task_states

from aifs import layout
from aifs.manifest import Manifest
from aifs.worker.checkpoint_cache import cached_path

DATE = "20250601_0000"


def test_a_gs_checkpoint_runs_end_to_end_with_its_declared_identity(airflow_db, gcs, bucket, seed, tiny_checkpoint,
                                                                    monkeypatch, tmp_path):
    store = gcs.create_bucket("aifs-test-checkpoint-store")
    store.blob("checkpoints/tiny.ckpt").upload_from_filename(tiny_checkpoint, checksum="crc32c")
    ref = f"gs://{store.name}/checkpoints/tiny.ckpt"
    identity = "sha256:" + hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    allowed = {ref: {"identity": identity}, **TEST_CHECKPOINTS}
    for name, value in {**local_deployment(tmp_path / "scratch"), "AIFS_ENS_CHECKPOINTS": json.dumps(allowed),
                        "AIFS_CHECKPOINT_CACHE": str(tmp_path / "host-cache")}.items():
        monkeypatch.setenv(name, value)
    seed(bucket, DATE, "1")
    dag = load_dag()

    dr = dag.test(logical_date=FORECAST_DAY, run_conf=run_conf(bucket, ref, members="1", lead_time=12))

    states = task_states(dr)
    assert dr.state == "success", states
    assert states[("verify", -1)] == "success"
    choose = next(ti for ti in dr.get_task_instances() if ti.task_id == "choose_environment")
    assert choose.xcom_pull(task_ids="choose_environment")["generation"] == "v1"
    manifest = Manifest.from_json(gcs.bucket(bucket).blob(layout.manifest_object(DATE, 1)).download_as_bytes())
    assert (manifest.checkpoint, manifest.checkpoint_identity) == (ref, identity)
    # the worker's download, in the host's cache under the object's generation
    generation = store.get_blob("checkpoints/tiny.ckpt").generation
    cached = Path(cached_path(store.name, "checkpoints/tiny.ckpt", generation, root=str(tmp_path / "host-cache")))
    assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == identity
