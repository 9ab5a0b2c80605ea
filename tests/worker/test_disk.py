"""Local disk: refuse to start without room for one input plus two windows; sweep crashed runs' files."""

from __future__ import annotations

import collections
import pickle
import shutil

import pytest
from worker_helpers import (
    DATE,
    forecast_names,
    make_state,
    manifest_names,
    seed,
    upload_state,
    worker_args,
)

from aifs import layout

pytestmark = pytest.mark.timeout(120)

_usage = collections.namedtuple("usage", "total used free")


def _fake_disk(monkeypatch, free: int) -> list[str]:
    """Patch the OS boundary (shutil.disk_usage): every path reports ``free`` bytes free."""
    asked: list[str] = []

    def disk_usage(path):
        asked.append(str(path))
        return _usage(total=100 * 2**30, used=100 * 2**30 - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def _spy_downloads(monkeypatch) -> list[str]:
    from google.cloud.storage import Blob

    calls: list[str] = []
    original = Blob.download_to_filename

    def spy(self, filename, *args, **kwargs):
        calls.append(self.name)
        return original(self, filename, *args, **kwargs)

    monkeypatch.setattr(Blob, "download_to_filename", spy)
    return calls


def _window_estimate(spec) -> int:
    """The spec's estimate of one 72 h window: output fields x grid points x 2 bytes x steps."""
    return len(spec.output_variables) * spec.grid_points * 2 * (72 // 6)


def _stale_files(dirs) -> dict[str, object]:
    stale = {
        "old_input": dirs.input / layout.input_filename(9),
        "partial": dirs.input / (layout.input_filename(1) + ".part"),
        "old_grib": dirs.output / layout.forecast_filename("20240101_0000", 4, 0, 72),
        "own_grib": dirs.output / layout.forecast_filename(DATE, 1, 72, 144),
        # a window's index, written beside it then uploaded: left behind only by a kill in between
        "old_index": dirs.output / layout.forecast_index_object("20240101_0000", 4, 0, 72).rsplit("/", 1)[1],
    }
    for path in stale.values():
        path.write_bytes(b"x" * 1000)
    keep = {
        "notes": dirs.output / "notes.txt",
        "other": dirs.input / "something_else.pkl",
        "grib_like": dirs.output / "my_analysis.grib",
        "index_like": dirs.output / "my_analysis.index",
    }
    for path in keep.values():
        path.write_text("not the worker's")
    return {"stale": stale, "keep": keep}


def test_out_of_disk_exit_14(monkeypatch, run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1])
    asked = _fake_disk(monkeypatch, free=1 * 2**20)
    downloads = _spy_downloads(monkeypatch)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1"))
    assert code == 14, text[-4000:]
    assert asked, "free space must be checked with shutil.disk_usage"
    assert downloads == []
    assert dirs.files() == []
    assert forecast_names(client, bucket.name) == [] and manifest_names(client, bucket.name) == []
    assert "disk" in text.lower() or "free" in text.lower()


def test_one_window_of_room_is_not_enough(monkeypatch, run_main, client, bucket, checkpoint, spec, dirs):
    seed(bucket, checkpoint, [1])
    input_size = bucket.get_blob(layout.input_object(DATE, 1)).size
    _fake_disk(monkeypatch, free=input_size + _window_estimate(spec))
    downloads = _spy_downloads(monkeypatch)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1"))
    assert code == 14, text[-4000:]
    assert downloads == [] and dirs.files() == []


def test_room_for_input_and_two_windows_is_enough(monkeypatch, run_main, client, bucket, checkpoint, spec, dirs):
    """Not over-demanding: 1.5x the estimate of input + two windows lets the member run."""
    seed(bucket, checkpoint, [1])
    input_size = bucket.get_blob(layout.input_object(DATE, 1)).size
    _fake_disk(monkeypatch, free=int(1.5 * (input_size + 2 * _window_estimate(spec))))
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=12))
    assert code == 0, text[-4000:]


def test_out_of_disk_still_sweeps_and_cleans(monkeypatch, run_main, client, bucket, checkpoint, dirs):
    """Leftovers are swept before the space check (they are what fills the disk)."""
    seed(bucket, checkpoint, [1])
    files = _stale_files(dirs)
    _fake_disk(monkeypatch, free=2**20)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1"))
    assert code == 14, text[-4000:]
    assert [p for p in files["stale"].values() if p.exists()] == []
    assert all(p.exists() for p in files["keep"].values())


def test_leftovers_swept_before_member(run_main, client, bucket, checkpoint, dirs):
    seed(bucket, checkpoint, [1])
    files = _stale_files(dirs)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=12))
    assert code == 0, text[-4000:]
    assert [str(p) for p in files["stale"].values() if p.exists()] == []
    assert sorted(dirs.files()) == sorted(str(p) for p in files["keep"].values()), "only the worker's own files go"
    assert "[CLEANUP]" in text


def test_valid_local_copy_not_downloaded_again(monkeypatch, run_main, client, bucket, checkpoint, dirs):
    state = make_state(checkpoint, DATE, 1)
    upload_state(bucket, state, 1)
    (dirs.input / layout.input_filename(1)).write_bytes(bucket.blob(layout.input_object(DATE, 1)).download_as_bytes())
    downloads = _spy_downloads(monkeypatch)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=12))
    assert code == 0, text[-4000:]
    assert downloads == [], "a local copy with the bucket's crc32c must be reused"
    assert dirs.files() == []


def test_stale_local_copy_replaced(monkeypatch, run_main, client, bucket, checkpoint, dirs):
    """A local pickle that differs from the bucket's (older run, other date) is not trusted."""
    upload_state(bucket, make_state(checkpoint, DATE, 1), 1)
    other = make_state(checkpoint, "20250531_1800", 1)
    (dirs.input / layout.input_filename(1)).write_bytes(pickle.dumps(other))
    downloads = _spy_downloads(monkeypatch)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1", lead_time=12))
    assert code == 0, text[-4000:]
    assert downloads == [layout.input_object(DATE, 1)]
    assert dirs.files() == []
