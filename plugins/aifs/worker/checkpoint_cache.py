"""A ``gs://bucket/object`` checkpoint as a local file: fetched once per host into a cache, verified.

anemoi-inference loads a checkpoint from a path (or Hugging Face), so a checkpoint a deployment keeps
in a bucket is downloaded first, with the worker's own storage client (its ``--service-account`` key
file, else the machine's account; the emulator in tests):

* the cached file's name holds the bucket, the object and the object's *generation*: a re-uploaded
  object (a new generation) is fetched anew, an unchanged one never twice;
* the download goes to ``<file>.part`` and is renamed only once its size and crc32c match the
  generation's record, so a killed download never leaves a file under the real name;
* an fcntl lock per cached file: two workers on one host download it once, the second waits;
* refused early (CheckpointFailed, exit 15), naming the checkpoint: no such object, a bucket the
  account may not read, no room on the cache's disk.

The cache is ``$AIFS_CHECKPOINT_CACHE``, else ``$XDG_CACHE_HOME/aifs-ens/checkpoints`` (default
``~/.cache/aifs-ens/checkpoints``). Older generations stay until someone deletes them: another
worker on the host may still be running one.

Each process remembers what it resolved a reference to (``local_copy``): the identity recorded in
manifests (aifs.worker.checkpoint_identity) is then that of the file the model loaded, even if the
object is replaced while the process runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
from urllib.parse import quote

from aifs.worker.errors import CheckpointFailed

LOG = logging.getLogger("aifs.worker")

GS_PREFIX = "gs://"
CACHE_ENV = "AIFS_CHECKPOINT_CACHE"
#: Room left on the cache's disk after the checkpoint: the worker's scratch (an input and two GRIB
#: windows) is often on the same disk, and a full disk fails in worse places than here.
ROOM_MARGIN_BYTES = 2 << 30
#: Seconds a metadata request may take, retries included; and the whole download (1-3 GB).
METADATA_DEADLINE_S = 120.0
DOWNLOAD_DEADLINE_S = 3600.0
#: Seconds between progress lines while a checkpoint downloads.
PROGRESS_EVERY_S = 10.0
#: Longest quoted object name kept whole in a cached file's name (file names are at most 255 bytes).
MAX_READABLE_NAME = 180

#: reference -> local file this process resolved it to (and loaded)
_resolved: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class CachedCheckpoint:
    reference: str  # gs://bucket/object
    path: str  # the local file
    generation: int
    size: int
    downloaded: bool  # False: an earlier download (this host's) was reused


def is_gs_reference(reference: str) -> bool:
    return reference.startswith(GS_PREFIX)


def split_reference(reference: str) -> tuple[str, str]:
    """``(bucket, object)`` of ``gs://bucket/object``; CheckpointFailed for anything else."""
    bucket, _, name = reference[len(GS_PREFIX):].partition("/") if is_gs_reference(reference) else ("", "", "")
    if not bucket or not name or name.endswith("/"):
        raise CheckpointFailed(f"checkpoint {reference}: expected gs://<bucket>/<object>")
    return bucket, name


def cache_dir() -> str:
    """Where fetched checkpoints live: $AIFS_CHECKPOINT_CACHE, else the user's cache directory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.expanduser(explicit)
    home_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home_cache, "aifs-ens", "checkpoints")


def cached_path(bucket: str, name: str, generation: int, root: str | None = None) -> str:
    """``<root>/<bucket>/<quoted object>@<generation>``: one file per object generation.

    Percent-quoting keeps distinct object names distinct in one flat directory (no ``/`` or ``..``
    from the object name reaches the path); a very long name is cut and told apart by its hash.
    """
    readable = quote(name, safe="")
    if len(readable) > MAX_READABLE_NAME:
        readable = readable[:MAX_READABLE_NAME - 17] + "." + hashlib.sha256(name.encode()).hexdigest()[:16]
    return os.path.join(root or cache_dir(), bucket, f"{readable}@{int(generation)}")


def local_copy(reference: str, client=None) -> str:
    """The local file of ``gs://`` ``reference`` for this process: the one resolved before, else fetched now.

    ``client``: the worker's storage client (aifs.worker.storage.make_client); without one, the
    machine's credentials (or the emulator's, under STORAGE_EMULATOR_HOST).
    """
    known = _resolved.get(reference)
    if known and os.path.isfile(known):
        return known
    if client is None:
        from google.auth.exceptions import GoogleAuthError

        from aifs.worker.storage import make_client

        try:
            client = make_client(None)
        except GoogleAuthError as exc:
            raise CheckpointFailed(f"checkpoint {reference}: no credentials to read it with: {exc}") from exc
    path = fetch(reference, client).path
    _resolved[reference] = path
    return path


def fetch(reference: str, client, root: str | None = None) -> CachedCheckpoint:
    """The object's current generation in the cache: reused when there, else downloaded and verified."""
    bucket_name, name = split_reference(reference)
    blob = _current_blob(client, bucket_name, name, reference)
    generation, size = int(blob.generation), int(blob.size or 0)
    path = cached_path(bucket_name, name, generation, root)
    if _is_cached(path, size):  # a finished download only ever appears by rename: no lock needed to reuse it
        return _reused(reference, path, generation, size)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise CheckpointFailed(f"checkpoint {reference}: cannot create the cache directory {os.path.dirname(path)} "
                               f"({exc}); set {CACHE_ENV} to a writable directory") from exc
    with _host_lock(path, reference):
        if _is_cached(path, size):  # another worker on this host fetched it while we waited
            return _reused(reference, path, generation, size)
        _require_room(reference, path, size)
        _download(blob, reference, path, generation, size)
    return CachedCheckpoint(reference, path, generation, size, downloaded=True)


def _current_blob(client, bucket_name: str, name: str, reference: str):
    """The object's metadata now (generation, size, crc32c); CheckpointFailed when it cannot be read."""
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import GoogleAuthError

    from aifs.worker.storage import BUCKET_ERRORS, _retry, _timeout

    try:
        blob = client.bucket(bucket_name).get_blob(name, timeout=_timeout(METADATA_DEADLINE_S),
                                                   retry=_retry(METADATA_DEADLINE_S))
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise CheckpointFailed(
            f"checkpoint {reference}: {exc.code} reading it: {_account(client)} needs roles/storage.objectViewer on "
            f"gs://{bucket_name} (gcloud storage buckets add-iam-policy-binding gs://{bucket_name} "
            f"--member=serviceAccount:ACCOUNT --role=roles/storage.objectViewer)") from exc
    except GoogleAuthError as exc:  # a key that no longer works, no credentials on the machine
        raise CheckpointFailed(f"checkpoint {reference}: {_account(client)} could not authenticate to read it: "
                               f"{type(exc).__name__}: {exc}") from exc
    except BUCKET_ERRORS as exc:
        raise CheckpointFailed(f"checkpoint {reference}: could not read the object's metadata: "
                               f"{type(exc).__name__}: {exc}") from exc
    if blob is None:
        raise CheckpointFailed(f"checkpoint not found: {reference} (no such object in bucket {bucket_name}, "
                               "or no such bucket)")
    if blob.generation is None or blob.size is None:
        raise CheckpointFailed(f"checkpoint {reference}: the bucket reports no generation or size for it")
    return blob


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _account(client) -> str:
    """Who the client is, for a message: the key file's or the machine's service account when known."""
    email = getattr(getattr(client, "_credentials", None), "service_account_email", None)
    if email and email != "default":
        return f"the worker's account {email}"
    return "the worker's account (its --service-account key file, else the machine's service account)"


def _is_cached(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _reused(reference: str, path: str, generation: int, size: int) -> CachedCheckpoint:
    LOG.info("[CHECKPOINT] %s reused from the cache %s (generation %d, %s; not downloaded again)",
             reference, path, generation, _size(size))
    return CachedCheckpoint(reference, path, generation, size, downloaded=False)


@contextlib.contextmanager
def _host_lock(path: str, reference: str):
    """An exclusive fcntl lock beside the cached file: one download per host, the others wait for it."""
    with open(path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info("[CHECKPOINT] %s: another process on this host is fetching it; waiting", reference)
            started = time.perf_counter()
            fcntl.flock(lock, fcntl.LOCK_EX)
            LOG.info("[CHECKPOINT] %s: waited %.1f s for the other process", reference, time.perf_counter() - started)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require_room(reference: str, path: str, size: int) -> None:
    """CheckpointFailed unless the cache's disk holds the checkpoint plus ROOM_MARGIN_BYTES."""
    directory = os.path.dirname(path)
    free = shutil.disk_usage(directory).free
    with contextlib.suppress(OSError):
        free += os.path.getsize(path + ".part")  # a killed download's leftover is overwritten
    need = size + ROOM_MARGIN_BYTES
    if free < need:
        raise CheckpointFailed(
            f"checkpoint {reference}: not enough room in {directory} to cache it: {free / 1e9:.2f} GB free, need "
            f"{need / 1e9:.2f} GB (the checkpoint's {size / 1e9:.2f} GB plus {ROOM_MARGIN_BYTES / 1e9:.2f} GB); "
            f"free {(need - free) / 1e9:.2f} GB there or set {CACHE_ENV} to a larger disk")


def _download(blob, reference: str, path: str, generation: int, size: int) -> None:
    """``blob`` (generation ``generation``) to ``path`` through ``path.part``, verified before the rename."""
    from google.auth.exceptions import GoogleAuthError
    from google.cloud.storage.exceptions import DataCorruption

    from aifs.worker.storage import BUCKET_ERRORS, _retry, _timeout, crc32c_of_file

    partial = path + ".part"
    LOG.info("[CHECKPOINT] downloading %s (generation %d, %s) to %s", reference, generation, _size(size), path)
    started = time.perf_counter()
    stop = threading.Event()
    ticker = threading.Thread(target=_log_progress, args=(reference, partial, size, started, stop), daemon=True)
    ticker.start()
    try:
        # this generation only: a replacement meanwhile fails the download (412) instead of mixing
        # two files; the crc32c below is the generation's own, whatever the server honoured
        blob.download_to_filename(partial, checksum="crc32c", if_generation_match=generation,
                                  timeout=_timeout(DOWNLOAD_DEADLINE_S), retry=_retry(DOWNLOAD_DEADLINE_S))
        got, crc = os.path.getsize(partial), crc32c_of_file(partial)
    except (DataCorruption, GoogleAuthError, *BUCKET_ERRORS) as exc:
        _remove(partial)
        raise CheckpointFailed(f"checkpoint {reference}: download of generation {generation} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    finally:
        stop.set()
        ticker.join()
    if got != size or (blob.crc32c and crc != blob.crc32c):
        _remove(partial)
        raise CheckpointFailed(f"checkpoint {reference}: the download does not verify: {got} bytes crc32c {crc}, "
                               f"generation {generation} is {size} bytes crc32c {blob.crc32c}")
    os.chmod(partial, 0o444)  # nothing on the host should modify a cached checkpoint in place
    os.replace(partial, path)
    seconds = time.perf_counter() - started
    LOG.info("[CHECKPOINT] %s cached at %s (generation %d): %s in %.1f s, %.1f MB/s, crc32c verified",
             reference, path, generation, _size(size), seconds, size / 1e6 / max(seconds, 1e-6))


def _log_progress(reference: str, partial: str, size: int, started: float, stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_EVERY_S):
        try:
            done = os.path.getsize(partial)
        except OSError:
            continue
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(size - done) / rate:.0f} s" if rate > 0 else "?"
        LOG.info("[CHECKPOINT] %s: %.0f%% (%s of %s), %.1f MB/s, ETA %s", reference,
                 100.0 * done / max(size, 1), _size(done), _size(size), rate / 1e6, eta)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
