"""Upload closed GRIB windows in the background while the model keeps rolling.

Each window is uploaded, read back and verified, then deleted locally. A slot limit keeps at
most ``max_on_disk`` windows on local disk (the one being written plus the one uploading): when
uploads fall behind, opening the next window waits, which in turn holds the model back, so
disk stays bounded by one input plus two windows whatever the network does.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
import time

from aifs.layout import Window
from aifs.manifest import ManifestObject
from aifs.worker import storage
from aifs.worker.errors import MemberError, UploadFailed

LOG = logging.getLogger("aifs.worker")


class WindowUploader:
    def __init__(self, bucket, member: int, threads: int, deadline: float, max_on_disk: int = 2):
        self.bucket, self.member, self.deadline = bucket, member, deadline
        self._pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"upload-m{member:03d}")
        self._slots = threading.Semaphore(max_on_disk)
        self._futures: list[cf.Future] = []
        self._failed = threading.Event()
        self.upload_seconds = 0.0

    def reserve_slot(self) -> None:
        """Block until a window may be opened on local disk (or an upload has failed)."""
        while not self._slots.acquire(timeout=0.5):
            self.raise_if_failed()

    def submit(self, local: str, name: str, window: Window, messages: int) -> None:
        self._futures.append(self._pool.submit(self._upload, local, name, window, messages))

    def _upload(self, local: str, name: str, window: Window, messages: int) -> ManifestObject:
        started = time.perf_counter()
        try:
            size, crc = storage.upload_verified(self.bucket, local, name, self.member, self.deadline)
            os.remove(local)  # safe in the bucket: free the disk for the next window
        except BaseException:
            self._failed.set()
            raise
        finally:
            self._slots.release()
        elapsed = time.perf_counter() - started
        self.upload_seconds += elapsed
        LOG.info("[UPLOADED] gs://%s/%s (%.1f MB, crc32c %s, %.1f s)", self.bucket.name, name, size / 1e6, crc, elapsed)
        return ManifestObject(name=name, size=size, crc32c=crc, window=(window.start, window.end), messages=messages)

    def raise_if_failed(self) -> None:
        if self._failed.is_set():
            for future in self._futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()

    def wait(self) -> list[ManifestObject]:
        """All uploads' results in window order; the first failure is raised."""
        results = []
        for future in self._futures:
            try:
                results.append(future.result())
            except MemberError:
                raise
            except Exception as exc:
                raise UploadFailed(self.member, f"upload crashed: {type(exc).__name__}: {exc}") from exc
        return sorted(results, key=lambda o: o.window)

    def shutdown(self) -> None:
        """Stop taking work; running uploads finish or fail on their own deadline."""
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
