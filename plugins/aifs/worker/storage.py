"""The bucket: checksum-validated downloads and verified uploads with google-cloud-storage.

Every transfer is checked against crc32c, and uploads are read back (size and crc32c of the
stored object) before the local copy may be deleted: the GCS emulator used in tests ignores
upload checksums, and a real bucket can lose a connection half-way, so trust only what reads back.
"""

from __future__ import annotations

import base64
import logging
import os

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from aifs.layout import UPLOAD_CHUNK_BYTES, input_filename, input_object
from aifs.worker.errors import DownloadFailed, InputMissing, UploadFailed

LOG = logging.getLogger("aifs.worker")

#: Per-request (connect, read) timeouts at most; each is also capped by the caller's deadline,
#: so a bucket that accepts connections but never answers cannot hold one request past it.
REQUEST_TIMEOUT = (10.0, 60.0)
#: What a bucket failure looks like through google-cloud-storage once retries are spent: API
#: errors (incl. RetryError), resumable-upload errors, dropped or refused connections.
BUCKET_ERRORS = (gexc.GoogleAPIError, InvalidResponse, ConnectionError, OSError, TimeoutError)


def make_client(service_account: str | None) -> storage.Client:
    """A storage client: the key file when given, anonymous on an emulator, else the machine's credentials."""
    if service_account:
        return storage.Client.from_service_account_json(service_account)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator"), credentials=AnonymousCredentials())
    return storage.Client()


def crc32c_of_file(path: str) -> str:
    """Base64 big-endian crc32c, the form GCS reports in ``Blob.crc32c``."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def _timeout(deadline: float) -> tuple[float, float]:
    """Per-request timeouts: a retry can then still happen inside ``deadline``."""
    connect, read = REQUEST_TIMEOUT
    return min(connect, deadline / 2), min(read, deadline / 2)


def _retry(deadline: float) -> Retry:
    """The library's own transient-error policy (5xx, 429, dropped connections), bounded by ``deadline``."""
    return DEFAULT_RETRY.with_timeout(deadline).with_delay(initial=1.0, maximum=10.0)


def find_input(bucket: storage.Bucket, date: str, member: int, deadline: float) -> storage.Blob:
    """The member's input object (with size and crc32c); InputMissing when it is not there."""
    name = input_object(date, member)
    url = f"gs://{bucket.name}/{name}"
    try:
        blob = bucket.get_blob(name, timeout=_timeout(deadline), retry=_retry(deadline))
    except BUCKET_ERRORS as exc:
        raise DownloadFailed(member, f"could not reach the bucket: {exc}", url) from exc
    if blob is None:
        raise InputMissing(member, "input pickle not found in the bucket", url)
    return blob


def download_input(blob: storage.Blob, member: int, input_dir: str, deadline: float) -> str:
    """Fetch the member's input pickle into ``input_dir``; reuse a local copy whose crc32c matches."""
    url = f"gs://{blob.bucket.name}/{blob.name}"
    local = os.path.join(input_dir, input_filename(member))
    if os.path.exists(local) and os.path.getsize(local) == blob.size and crc32c_of_file(local) == blob.crc32c:
        LOG.info("[DOWNLOAD] %s: valid local copy %s (crc32c %s), not downloading again", url, local, blob.crc32c)
        return local

    partial = local + ".part"  # never leave a half-downloaded file under the real name
    try:
        blob.download_to_filename(partial, checksum="crc32c", timeout=_timeout(deadline), retry=_retry(deadline))
    except (DataCorruption, *BUCKET_ERRORS) as exc:
        _remove(partial)
        raise DownloadFailed(member, f"download failed: {exc}", url) from exc
    os.replace(partial, local)
    LOG.info("[DOWNLOAD] %s -> %s (%.1f MB)", url, local, blob.size / 1e6)
    return local


def upload_verified(bucket: storage.Bucket, local: str, name: str, member: int, deadline: float,
                    source=None) -> tuple[int, str]:
    """Upload ``local`` as ``name`` in 32 MiB chunks; read it back; return (size, crc32c) once verified.

    ``source``, when given, is a stream of ``local`` read while it is still being written (see
    ``growing.GrowingFile``): the upload then ends when the stream does. Either way the object
    is checked against the finished local file, read afresh.
    """
    url = f"gs://{bucket.name}/{name}"
    blob = bucket.blob(name, chunk_size=UPLOAD_CHUNK_BYTES)
    try:
        if source is None:
            blob.upload_from_filename(local, checksum="crc32c", timeout=_timeout(deadline), retry=_retry(deadline))
        else:  # no size: a resumable upload that takes the stream's first short read as its end
            blob.upload_from_file(source, size=None, checksum="crc32c", timeout=_timeout(deadline),
                                  retry=_retry(deadline))
        size, crc = os.path.getsize(local), crc32c_of_file(local)
        stored = bucket.get_blob(name, timeout=_timeout(deadline), retry=_retry(deadline))
    except (DataCorruption, *BUCKET_ERRORS) as exc:
        raise UploadFailed(member, f"upload failed: {exc}", url) from exc
    if stored is None or stored.size != size or stored.crc32c != crc:
        got = "nothing" if stored is None else f"{stored.size} bytes, crc32c {stored.crc32c}"
        raise UploadFailed(member, f"uploaded object does not verify: sent {size} bytes crc32c {crc}, bucket has {got}", url)
    return size, crc


def upload_text(bucket: storage.Bucket, text: str, name: str, member: int, deadline: float) -> None:
    url = f"gs://{bucket.name}/{name}"
    try:
        bucket.blob(name).upload_from_string(
            text, content_type="application/json", timeout=_timeout(deadline), retry=_retry(deadline)
        )
    except BUCKET_ERRORS as exc:
        raise UploadFailed(member, f"upload failed: {exc}", url) from exc


def delete_object(bucket: storage.Bucket, name: str, member: int, deadline: float) -> None:
    url = f"gs://{bucket.name}/{name}"
    try:
        bucket.blob(name).delete(timeout=_timeout(deadline), retry=_retry(deadline))
    except gexc.NotFound:
        pass
    except BUCKET_ERRORS as exc:
        raise UploadFailed(member, f"could not delete: {exc}", url) from exc


def object_exists(bucket: storage.Bucket, name: str, deadline: float = 60.0) -> bool:
    return bucket.get_blob(name, timeout=_timeout(deadline), retry=_retry(deadline)) is not None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
