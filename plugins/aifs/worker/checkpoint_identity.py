"""The identity of the checkpoint this worker loads: what it is by content, not by name.

``sha256:<hex>`` of a checkpoint file, or of a ``gs://`` checkpoint's local copy (the file the model
loads, aifs.worker.checkpoint_cache); ``hf:<revision>`` (the resolved commit) for a Hugging Face id.
Manifests record it and aifs.completeness compares it, so a member computed with another checkpoint
is never taken for complete, whatever path or name the checkpoint had.

A checkpoint is 1-3 GB: its hash is cached next to the file (``<file>.sha256``), keyed by the
file's size and modification time, so each file is read once, not once per process or member.
Where the checkpoint's directory is read-only, the cache goes to the user's cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from aifs.completeness import is_checkpoint_identity
from aifs.worker.errors import CheckpointFailed

LOG = logging.getLogger("aifs.worker")

CACHE_SUFFIX = ".sha256"
_memo: dict[tuple, str] = {}


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _cache_paths(path: str) -> list[str]:
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return [path + CACHE_SUFFIX, os.path.join(home_cache, "aifs-ens", "checkpoint-sha256", key + ".json")]


def _read_cache(cache: str, path: str, size: int, mtime_ns: int) -> str | None:
    try:
        with open(cache) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if (isinstance(data, dict) and data.get("size") == size and data.get("mtime_ns") == mtime_ns
            and data.get("path") == os.path.realpath(path) and is_checkpoint_identity(f"sha256:{data.get('sha256')}")):
        return f"sha256:{data['sha256']}"
    return None


def _write_cache(path: str, size: int, mtime_ns: int, digest: str) -> None:
    record = json.dumps({"path": os.path.realpath(path), "size": size, "mtime_ns": mtime_ns, "sha256": digest})
    for cache in _cache_paths(path):
        partial = f"{cache}.{os.getpid()}.part"  # never a half-written cache under the real name
        try:
            os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
            with open(partial, "w") as f:
                f.write(record)
            os.replace(partial, cache)
            return
        except OSError:
            try:
                os.remove(partial)
            except OSError:
                pass
    LOG.warning("[CHECKPOINT] could not cache the sha256 of %s anywhere: it will be hashed again next time", path)


def file_identity(path: str) -> str:
    """``sha256:<hex>`` of the file at ``path``, from its cache when size and mtime still match."""
    size, mtime_ns = _stat_key(path)
    for cache in _cache_paths(path):
        cached = _read_cache(cache, path, size, mtime_ns)
        if cached:
            return cached
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    if _stat_key(path) != (size, mtime_ns):
        raise CheckpointFailed(f"checkpoint {path} changed while it was being hashed")
    LOG.info("[CHECKPOINT] sha256 of %s (%.2f GB) in %.1f s", path, size / 1e9, time.perf_counter() - started)
    _write_cache(path, size, mtime_ns, digest.hexdigest())
    return f"sha256:{digest.hexdigest()}"


def hf_revision(repo_id: str, filename: str | None) -> str:
    """The commit a Hugging Face id resolves to now: the Hub's answer, else the local cache's (offline)."""
    import huggingface_hub
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return huggingface_hub.HfApi().model_info(repo_id).sha
        except Exception as exc:  # no network, rate limit...: the cache, as the downloader itself would
            LOG.warning("[CHECKPOINT] could not ask the Hub for %s's revision (%s); using the local cache", repo_id, exc)
    if filename:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str):
            return os.path.basename(os.path.dirname(cached))  # .../snapshots/<commit>/<filename>
    ref = os.path.join(constants.HF_HUB_CACHE, f"models--{repo_id.replace('/', '--')}", "refs", "main")
    try:
        with open(ref) as f:
            return f.read().strip()
    except OSError:
        raise CheckpointFailed(f"cannot resolve the revision of Hugging Face checkpoint {repo_id}: "
                               "not reachable and not in the local cache") from None


def checkpoint_identity(reference: str) -> str:
    """The identity of the checkpoint ``reference`` (a file path, ``gs://`` object or Hugging Face id) names now.

    A ``gs://`` object is the file this process fetched it to (and loaded), hashed like any file.
    """
    from aifs.worker.model import resolve_checkpoint

    source = resolve_checkpoint(reference)  # the loader's own resolution; CheckpointFailed when nothing is there
    if isinstance(source, str):
        if not os.path.isfile(source):
            raise CheckpointFailed(f"checkpoint {reference} is not a file")
        key = ("file", os.path.realpath(source), *_stat_key(source))
        if key not in _memo:
            try:
                _memo[key] = file_identity(source)
            except OSError as exc:
                raise CheckpointFailed(f"could not read checkpoint {reference}: {exc}") from exc
        return _memo[key]
    hf = source["huggingface"]
    key = ("hf", hf["repo_id"], hf.get("filename"))
    if key not in _memo:
        revision = hf_revision(hf["repo_id"], hf.get("filename"))
        identity = f"hf:{revision}"
        if not is_checkpoint_identity(identity):
            raise CheckpointFailed(f"Hugging Face checkpoint {reference} resolved to an odd revision {revision!r}")
        _memo[key] = identity
    return _memo[key]


def check_checkpoint(reference: str, expected: str | None) -> str:
    """The loaded checkpoint's identity; CheckpointFailed (exit 15) when it is not ``expected``."""
    identity = checkpoint_identity(reference)
    if expected and identity != expected:
        raise CheckpointFailed(f"checkpoint {reference} is {identity}, but this run expects {expected}: refusing to "
                               "run it (a different checkpoint than the deployment declared; see AIFS_ENS_CHECKPOINTS)")
    return identity
