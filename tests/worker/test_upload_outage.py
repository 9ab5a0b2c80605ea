"""The bucket stops answering in the middle of a member's uploads: exit 13, clean disk, no manifest;
the rerun after the bucket is back completes the member."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest
from worker_helpers import (
    Dirs,
    expected_forecast_objects,
    forecast_names,
    manifest_names,
    read_manifest,
    seed,
    subprocess_env,
    tagged,
    worker_command,
    worker_args,
)

from aifs.testing.emulator import StorageEmulator, anonymous_client

LEAD = 150  # three windows; with >= 0.15 s a step, the second closes >= 1.8 s after the first
UPLOAD_TIMEOUT = 10

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def persisted_emulator(tmp_path):
    emu = StorageEmulator(data_dir=str(tmp_path / "gcs-data"), log_path=str(tmp_path / "emulator.log")).start()
    yield emu
    emu.stop()


def _run_until_first_upload(args, emulator, cwd, on_first_upload, deadline: float, after_action: float):
    """Start the worker, call ``on_first_upload`` at its first [UPLOADED] line; (exit code, output, seconds after).

    The worker is killed ``deadline`` s after start if it never uploads, or ``after_action`` s after the action.
    """
    proc = subprocess.Popen(worker_command(args), env=subprocess_env(emulator.url), cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timers = [threading.Timer(deadline, proc.kill)]
    timers[0].start()
    lines, acted_at = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if acted_at is None and "[UPLOADED]" in line:
                on_first_upload()
                acted_at = time.monotonic()
                timers[0].cancel()
                timers.append(threading.Timer(after_action, proc.kill))
                timers[-1].start()
        code = proc.wait()
    finally:
        for timer in timers:
            timer.cancel()
        proc.kill()
    return code, "".join(lines), (time.monotonic() - acted_at) if acted_at else None


def test_bucket_goes_away_mid_member_then_rerun(persisted_emulator, slow_checkpoint, tmp_path, monkeypatch, call_main):
    emu = persisted_emulator
    client = anonymous_client(emu.url)
    bucket = client.create_bucket("outage")
    seed(bucket, slow_checkpoint, [1])
    dirs = Dirs(tmp_path / "scratch")
    args = worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, members="1", lead_time=LEAD,
                       extra=["--upload-timeout", str(UPLOAD_TIMEOUT)])

    code, out, after = _run_until_first_upload(args, emu, tmp_path, emu.stop, deadline=120,
                                               after_action=UPLOAD_TIMEOUT + 40)
    assert after is not None, "no [UPLOADED] line:\n" + out[-4000:]
    assert code == 13, out[-5000:]
    assert len(tagged(out, "[UPLOADED]")) < 3, "the outage came too late to test anything"
    assert dirs.files() == [], "local files must be cleaned after a failed upload"
    assert "[CLEANUP]" in out
    assert "[RERUN]" in out

    # the bucket comes back (same port, same data dir); nothing says the member is complete
    emu.start()
    assert manifest_names(client, bucket.name) == []
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.url)
    monkeypatch.chdir(tmp_path)
    code, out = call_main(args)  # in-process: saves a second torch import
    assert code == 0, out[-5000:]
    assert forecast_names(client, bucket.name) == expected_forecast_objects(1, LEAD)
    manifest = read_manifest(bucket, 1)
    assert [o.name for o in manifest.objects] == expected_forecast_objects(1, LEAD)
    for obj in manifest.objects:
        blob = bucket.get_blob(obj.name)
        assert (blob.size, blob.crc32c) == (obj.size, obj.crc32c)
    assert dirs.files() == []


def test_bucket_hangs_mid_member(slow_checkpoint, tmp_path):
    """A bucket that accepts connections but never answers (SIGSTOP): --upload-timeout still bounds the member."""
    emu = StorageEmulator(log_path=str(tmp_path / "emulator.log")).start()
    try:
        client = anonymous_client(emu.url)
        bucket = client.create_bucket("hang")
        seed(bucket, slow_checkpoint, [1])
        dirs = Dirs(tmp_path / "scratch")
        args = worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, members="1", lead_time=LEAD,
                           extra=["--upload-timeout", str(UPLOAD_TIMEOUT)])
        code, out, after = _run_until_first_upload(args, emu, tmp_path, emu.pause, deadline=120,
                                                   after_action=UPLOAD_TIMEOUT + 25)
        emu.resume()
        assert after is not None, "no [UPLOADED] line:\n" + out[-4000:]
        assert code == 13, (
            f"exit {code} ({'killed: still running' if code == -9 else 'exited'} {after:.0f} s after the bucket hung, "
            f"--upload-timeout {UPLOAD_TIMEOUT}):\n" + out[-3000:]
        )
        assert dirs.files() == []
        assert manifest_names(client, bucket.name) == []
    finally:
        emu.resume()
        emu.stop()
