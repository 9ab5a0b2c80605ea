"""GRIB encoded in writer processes (aifs.worker.grib_writers): same bytes, same failures, nothing left over.

Every test runs the real worker on the tiny model against the emulator. The writer processes are
real spawned processes; the one killed with SIGKILL is a real one.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest
from worker_helpers import (
    DATE,
    Dirs,
    expected_forecast_objects,
    forecast_names,
    manifest_names,
    seed,
    subprocess_env,
    worker_args,
    worker_command,
)

from aifs.worker.grib_writers import SHM_PREFIX, default_writers, shutdown_pool, writers_setting

pytestmark = pytest.mark.timeout(300)

LEAD = 150  # three windows: h000-072, h072-144, h144-150


def _shm_segments(pid: int) -> set[str]:
    """The shared-memory segments of the process ``pid``'s writer pool still under /dev/shm."""
    return {os.path.basename(p) for p in glob.glob(f"/dev/shm/{SHM_PREFIX}{pid}-*")}


def _writer_processes(pid: int) -> list[psutil.Process]:
    """The spawned GRIB writer processes of ``pid`` (not multiprocessing's resource tracker)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stored(client, bucket_name: str) -> dict[str, tuple[int, str]]:
    """The bucket's own size and crc32c of every forecast object."""
    return {b.name: (b.size, b.crc32c) for b in client.list_blobs(bucket_name, prefix=f"{DATE}/forecasts/")}


def test_writer_processes_give_the_same_bytes_as_the_in_process_writer(run_main, client, bucket, checkpoint, tmp_path):
    shutdown_pool()  # a pool left by an earlier test of this process would be reused, not started
    seed(bucket, checkpoint, [1])
    stored = {}
    for writers in (0, 1, 3):
        dirs = Dirs(tmp_path / f"w{writers}")
        code, out = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, lead_time=LEAD,
                                         extra=["--force", "--grib-writers", str(writers)]))
        assert code == 0, out
        stored[writers] = _stored(client, bucket.name)
        assert dirs.files() == [], "local windows and input are deleted after upload"
        if writers:
            assert f"[GRIB] {writers} writer processes started" in out
            assert "queue bound:" in out
    assert sorted(stored[0]) == expected_forecast_objects(1, LEAD)
    assert stored[1] == stored[0]
    assert stored[3] == stored[0]
    assert _shm_segments(os.getpid()), "the pool (and its ring) lives on for the next member"
    shutdown_pool()
    assert _shm_segments(os.getpid()) == set()
    assert _writer_processes(os.getpid()) == []


def test_a_killed_writer_fails_the_member_with_exit_12_and_leaves_nothing(run_main, client, bucket, slow_checkpoint,
                                                                         tmp_path):
    """SIGKILL one writer process mid-window: exit 12, streams cancelled, no object, no manifest, no leftovers."""
    shutdown_pool()
    seed(bucket, slow_checkpoint, [1])
    dirs = Dirs(tmp_path / "scratch")
    killed = {}

    def kill_one_writer():
        _wait_for(lambda: list(dirs.output.glob("*.grib")), what="the first window file")
        victim = _wait_for(lambda: _writer_processes(os.getpid()), what="writer processes")[0]
        killed["pid"] = victim.pid
        os.kill(victim.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_one_writer, daemon=True)
    killer.start()
    code, out = run_main(worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, lead_time=LEAD,
                                     extra=["--grib-writers", "2"]))
    killer.join(timeout=5)
    assert killed, "the test never killed a writer"
    assert code == 12, out
    assert f"(pid {killed['pid']}) died with exit code -9" in out
    assert forecast_names(client, bucket.name) == [], "no object under a window's name"
    assert manifest_names(client, bucket.name) == []
    assert dirs.files() == []
    assert _writer_processes(os.getpid()) == [], "the other writers are ended too"
    assert _shm_segments(os.getpid()) == set()

    # the next run starts a fresh pool and completes the member
    code, out = run_main(worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, lead_time=LEAD,
                                     extra=["--grib-writers", "2"]))
    assert code == 0, out
    assert forecast_names(client, bucket.name) == expected_forecast_objects(1, LEAD)
    shutdown_pool()


def test_a_writer_that_cannot_write_fails_the_member_with_exit_12(run_main, client, bucket, slow_checkpoint, tmp_path):
    """The window's directory vanishes under the writers: the writer reports it, the member fails with 12."""
    shutdown_pool()
    seed(bucket, slow_checkpoint, [1])
    dirs = Dirs(tmp_path / "scratch")

    def remove_output_dir():
        _wait_for(lambda: list(dirs.output.glob("*.grib")), what="the first window file")
        for path in dirs.output.glob("*"):
            path.unlink()
        dirs.output.rmdir()

    remover = threading.Thread(target=remove_output_dir, daemon=True)
    remover.start()
    code, out = run_main(worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, lead_time=LEAD,
                                     extra=["--grib-writers", "2"]))
    remover.join(timeout=5)
    assert code == 12, out
    assert "GRIB writing failed: GRIB writer process" in out and "FileNotFoundError" in out
    assert forecast_names(client, bucket.name) == []
    assert manifest_names(client, bucket.name) == []
    assert _writer_processes(os.getpid()) == []
    assert _shm_segments(os.getpid()) == set()


def test_sigterm_ends_the_writers_and_frees_shared_memory(emulator, client, bucket, slow_checkpoint, tmp_path):
    """``python -m aifs.worker`` gets SIGTERM mid-member: exit 143, no writer process or /dev/shm segment left."""
    seed(bucket, slow_checkpoint, [1])
    dirs = Dirs(tmp_path / "scratch")
    args = worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, lead_time=LEAD,
                       extra=["--grib-writers", "2"])
    proc = subprocess.Popen(worker_command(args), env=subprocess_env(emulator.url), cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: list(dirs.output.glob("*.grib")), what="the first window file")
        writers = _wait_for(lambda: len(_writer_processes(proc.pid)) == 2 and _writer_processes(proc.pid),
                            what="two writer processes")
        assert _shm_segments(proc.pid), "the ring is in /dev/shm while the member runs"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out
    assert "[TERMINATED]" in out
    gone, alive = psutil.wait_procs(writers, timeout=5)
    assert alive == [], f"orphan writer processes: {alive}"
    assert _shm_segments(proc.pid) == set()
    assert forecast_names(client, bucket.name) == []
    assert manifest_names(client, bucket.name) == []
    assert dirs.files() == []


def test_writers_setting_follows_flag_then_env_then_cores(monkeypatch):
    monkeypatch.delenv("AIFS_GRIB_WRITERS", raising=False)
    assert default_writers() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert writers_setting(None) == default_writers()
    monkeypatch.setenv("AIFS_GRIB_WRITERS", "4")
    assert writers_setting(None) == 4
    assert writers_setting(0) == 0
    monkeypatch.setenv("AIFS_GRIB_WRITERS", "many")
    with pytest.raises(ValueError, match="AIFS_GRIB_WRITERS"):
        writers_setting(None)


def test_row_block_copies_give_every_field_exactly_whatever_its_layout():
    """The runner's fields are column views of one (points, fields) array: copied by row blocks,
    each field must still land whole and unchanged (a length that is not a multiple of the block,
    fields in another order than their columns, contiguous arrays and 2-D arrays beside them)."""
    import numpy as np

    from aifs.worker.windows import GATHER_ROWS, contiguous_fields, copy_fields_into

    rng = np.random.default_rng(7)
    points = 3 * GATHER_ROWS + 123
    output = rng.standard_normal((points, 9)).astype(np.float32)
    other = rng.standard_normal((points // 2, 4))  # strided too, another length, float64
    arrays = [output[:, i] for i in (4, 0, 8, 2)] + [other[:, 1], rng.standard_normal(points).astype(np.float32),
                                                     rng.standard_normal((5, 7))]
    assert not arrays[0].flags.c_contiguous
    destinations = [np.full(a.shape, np.nan, a.dtype) for a in arrays]
    copy_fields_into(list(zip(destinations, arrays)))
    for destination, array in zip(destinations, arrays):
        np.testing.assert_array_equal(destination, array)

    # the in-process writer's contiguous copies: same values, contiguous, the runner's dict untouched
    state = {"date": "d", "step": 6, "fields": {f"f{i}": output[:, i] for i in range(9)} | {"c": arrays[5]}}
    before = dict(state["fields"])
    copied = contiguous_fields(state)
    assert state["fields"] == before and copied["date"] == "d" and copied["fields"]["c"] is arrays[5]
    for name, values in before.items():
        assert copied["fields"][name].flags.c_contiguous
        np.testing.assert_array_equal(copied["fields"][name], values)
