"""The loaded checkpoint's identity: sha256 of the file (hashed once, cached by size+mtime) or the HF revision."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from aifs.worker import checkpoint_identity as ci
from aifs.worker.errors import CheckpointFailed


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(ci, "_memo", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_file_identity_is_cached_next_to_the_file_by_size_and_mtime(tmp_path):
    ckpt = write(tmp_path / "model.ckpt", b"weights" * 1000)
    real = "sha256:" + hashlib.sha256(b"weights" * 1000).hexdigest()
    assert ci.file_identity(ckpt) == real
    cache = json.loads((tmp_path / "model.ckpt.sha256").read_text())
    st = os.stat(ckpt)
    assert (cache["size"], cache["mtime_ns"], "sha256:" + cache["sha256"]) == (st.st_size, st.st_mtime_ns, real)

    # the cache is what answers while size and mtime match (proof: a planted value comes back)
    planted = "ab" * 32
    (tmp_path / "model.ckpt.sha256").write_text(json.dumps({**cache, "sha256": planted}))
    assert ci.file_identity(ckpt) == "sha256:" + planted
    # a rewritten file (new mtime) is hashed again
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ci.file_identity(ckpt) == real


def test_unwritable_cache_beside_the_file_goes_to_the_user_cache(tmp_path):
    """A read-only checkpoint directory (a mounted volume): the hash is cached in the user's cache instead."""
    ckpt = write(tmp_path / "model.ckpt", b"x" * 100)
    (tmp_path / "model.ckpt.sha256").mkdir()  # the cache beside the file cannot be written (works as root too)
    real = "sha256:" + hashlib.sha256(b"x" * 100).hexdigest()
    assert ci.file_identity(ckpt) == real
    (cached,) = (tmp_path / "user-cache" / "aifs-ens" / "checkpoint-sha256").iterdir()
    assert "sha256:" + json.loads(cached.read_text())["sha256"] == real
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.ckpt.sha256", "user-cache"]  # no .part left


def test_expected_identity_is_enforced(tmp_path):
    ckpt = write(tmp_path / "model.ckpt", b"abc")
    real = "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert ci.check_checkpoint(ckpt, real) == real
    assert ci.check_checkpoint(ckpt, None) == real
    with pytest.raises(CheckpointFailed, match="this run expects sha256:0000"):
        ci.check_checkpoint(ckpt, "sha256:" + "0" * 64)


def test_missing_checkpoint_fails_like_a_bad_checkpoint(tmp_path):
    with pytest.raises(CheckpointFailed, match="checkpoint not found"):
        ci.checkpoint_identity(str(tmp_path / "nope.ckpt"))


def test_hugging_face_id_is_its_resolved_revision_offline(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE (as in the worker image) the revision comes from the baked cache."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--ecmwf--aifs-ens-1.0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "aifs-ens-crps-1.0.ckpt").write_bytes(b"w")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert ci.checkpoint_identity("ecmwf/aifs-ens-1.0") == f"hf:{commit}"
    monkeypatch.setattr(ci, "_memo", {})
    with pytest.raises(CheckpointFailed, match="not in the local cache"):
        ci.checkpoint_identity("ecmwf/other-model")
