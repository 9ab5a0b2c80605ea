"""Stream each GRIB window into the bucket while it is written, then verify it and delete it locally.

A window's upload starts when the window is opened: its resumable upload session is fed 32 MiB
chunks from the growing file (``growing.GrowingFile``) while the model rolls on, so closing the
window leaves one short chunk to send, not the whole window. The object only exists once the
window is complete; it is then read back (size and crc32c against the finished local file) and
the local file deleted. Before that, the finished file is indexed (aifs.worker.grib_index: one JSON
line per message, read from the headers) and the index uploaded and verified the same way beside
it, so the products can fetch the few messages they need by byte ranges. An index that does not
count the messages the writer wrote fails the member like any GRIB writing failure.

A slot limit keeps at most ``max_on_disk`` windows on local disk (the one being written plus the
one finishing its upload): when uploads fall behind, opening the next window waits, which in
turn holds the model back, so disk stays bounded by one input plus two windows whatever the
network does.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import threading
import time

from aifs.layout import Window, forecast_index_object, forecast_object
from aifs.manifest import IndexObject, ManifestObject
from aifs.worker import grib_index, storage
from aifs.worker.errors import InferenceFailed, MemberError, UploadFailed
from aifs.worker.growing import GrowingFile

LOG = logging.getLogger("aifs.worker")


@dataclasses.dataclass
class WindowUpload:
    """One window on its way to the bucket; the writer completes it when the window's file is closed."""

    local: str
    name: str
    window: Window
    stream: GrowingFile
    future: cf.Future | None = None
    messages: int = 0
    completed_at: float = 0.0
    sent_before_close: int = 0  # bytes already read into the upload when the window closed

    def complete(self, messages: int) -> None:
        self.messages, self.completed_at = messages, time.perf_counter()
        self.sent_before_close = self.stream.tell()
        self.stream.complete()


class WindowUploader:
    """``index_windows``: index each window (the worker always does; False only for payloads that are not GRIB)."""

    def __init__(self, bucket, member: int, threads: int, deadline: float, max_on_disk: int = 2,
                 index_windows: bool = True):
        self.bucket, self.member, self.deadline = bucket, member, deadline
        self.index_windows = index_windows
        # At most ``max_on_disk`` windows are open at once, so more threads than that would idle.
        self._pool = cf.ThreadPoolExecutor(max_workers=max(1, min(threads, max_on_disk)),
                                           thread_name_prefix=f"upload-m{member:03d}")
        self._slots = threading.Semaphore(max_on_disk)
        self._uploads: list[WindowUpload] = []
        self._failed = threading.Event()
        self._timing_lock = threading.Lock()  # two upload threads add to the totals
        self.upload_seconds = 0.0  # from a window's opening to its object verified, summed
        self.tail_seconds = 0.0  # from a window's closing to its object verified, summed: what streaming leaves
        self.index_seconds = 0.0  # building the windows' indexes, summed

    def open_window(self, local: str, name: str, window: Window, interrupt=None) -> WindowUpload:
        """Wait for a disk slot, then start streaming ``local`` (not written yet) to ``name``.

        ``interrupt`` (optional) is called while waiting and may raise: a GRIB writer process that
        died holding the step a window needs would otherwise leave the slot taken for ever.
        """
        while not self._slots.acquire(timeout=0.5):
            self.raise_if_failed()
            if interrupt is not None:
                interrupt()
        try:  # the window is written from scratch: never stream a stale file left under its name
            os.remove(local)
        except FileNotFoundError:
            pass
        upload = WindowUpload(local, name, window, GrowingFile(local))
        upload.future = self._pool.submit(self._upload, upload)
        self._uploads.append(upload)
        return upload

    def _upload(self, upload: WindowUpload) -> ManifestObject:
        started = time.perf_counter()
        try:
            size, crc = storage.upload_verified(self.bucket, upload.local, upload.name, self.member, self.deadline,
                                                source=upload.stream)
            index = self._upload_index(upload) if self.index_windows else None
            os.remove(upload.local)  # safe in the bucket: free the disk for the next window
        except BaseException as exc:
            self._failed.set()
            if isinstance(exc, Exception) and not isinstance(exc, MemberError):
                # e.g. the library's ValueError on a partly committed chunk: still the member's upload failure
                raise UploadFailed(self.member, f"upload crashed: {type(exc).__name__}: {exc}") from exc
            raise
        finally:
            upload.stream.close()
            self._slots.release()
        done = time.perf_counter()
        tail = done - upload.completed_at
        with self._timing_lock:
            self.upload_seconds += done - started
            self.tail_seconds += tail
        LOG.info("[UPLOADED] gs://%s/%s (%.1f MB, crc32c %s; %.1f MB streamed while written, verified %.1f s after "
                 "the window closed)", self.bucket.name, upload.name, size / 1e6, crc, upload.sent_before_close / 1e6, tail)
        window = upload.window
        return ManifestObject(name=upload.name, size=size, crc32c=crc, window=(window.start, window.end),
                              messages=upload.messages, index=index)

    def _upload_index(self, upload: WindowUpload) -> IndexObject:
        """Index the finished window, check it counts the writer's messages, upload it verified, delete it locally."""
        window = upload.window
        date = upload.name.split("/", 1)[0]
        if forecast_object(date, self.member, window.start, window.end) != upload.name:
            raise ValueError(f"{upload.name} is not member {self.member:03d}'s window h{window.start:03d}-{window.end:03d}")
        name = forecast_index_object(date, self.member, window.start, window.end)
        local = os.path.splitext(upload.local)[0] + ".index"
        started = time.perf_counter()
        try:
            lines = grib_index.build(upload.local)
        except Exception as exc:  # eccodes' errors on a message it cannot parse: the window was not written right
            raise InferenceFailed(self.member, f"window h{window.start:03d}-{window.end:03d} cannot be indexed: "
                                               f"{type(exc).__name__}: {exc}", upload.local) from exc
        seconds = time.perf_counter() - started
        if len(lines) != upload.messages:
            raise InferenceFailed(self.member, f"window h{window.start:03d}-{window.end:03d}: its index lists "
                                               f"{len(lines)} GRIB messages, the writer wrote {upload.messages}",
                                  upload.local)
        try:
            grib_index.write(local, lines)
            size, crc = storage.upload_verified(self.bucket, local, name, self.member, self.deadline)
        finally:
            try:
                os.remove(local)
            except FileNotFoundError:
                pass
        with self._timing_lock:
            self.index_seconds += seconds
        LOG.info("[INDEX] gs://%s/%s: %d messages, %.1f kB (built in %.2f s)", self.bucket.name, name, len(lines),
                 size / 1e3, seconds)
        return IndexObject(name=name, size=size, crc32c=crc)

    def raise_if_failed(self) -> None:
        if self._failed.is_set():
            for upload in self._uploads:
                if upload.future.done() and upload.future.exception() is not None:
                    raise upload.future.exception()

    def wait(self) -> list[ManifestObject]:
        """All uploads' results in window order; the first failure is raised."""
        return sorted((upload.future.result() for upload in self._uploads), key=lambda o: o.window)

    def shutdown(self) -> None:
        """Stop: uploads of windows never completed are cancelled unfinalized; running requests end on their deadline."""
        for upload in self._uploads:
            upload.stream.cancel()
            upload.future.cancel()
        self._pool.shutdown(wait=True)
