"""A file that is still being written, read as a stream that ends only when its writer says so.

The uploader hands this to google-cloud-storage's resumable upload (``Blob.upload_from_file`` with
no size): the library reads ``chunk_size`` bytes at a time and sends each as a chunk, and takes a
short read as the end of the object. So ``read`` blocks until a whole chunk is on disk and returns
a short read only once the window's GRIB file is closed: a window's bytes are in the bucket's
upload session as fast as they are written, and closing the window leaves one chunk to send.

Only bytes already on disk are read, and GRIB outputs only append, so what has been read never
changes; the uploader still reads the finished file afresh for the crc32c it checks the stored
object against. A cancelled stream raises instead of ending, so the upload is never finalized and
no partial object ever appears under the window's name.
"""

from __future__ import annotations

import os
import threading


class StreamCancelled(Exception):
    """The window will not be completed (the member failed); its upload must not be finalized."""


class GrowingFile:
    """Read-only, seekable stream over ``path`` while another thread appends to it."""

    def __init__(self, path: str, poll_seconds: float = 0.05):
        self.path = path
        self.poll_seconds = poll_seconds
        self._complete = threading.Event()
        self._cancelled = threading.Event()
        self._file = None
        self._pos = 0

    # -- the writer's side -------------------------------------------------------------------
    def complete(self) -> None:
        """The file is closed and whole: reads may now end at its end."""
        self._complete.set()

    def cancel(self) -> None:
        self._cancelled.set()

    # -- the uploader's side -----------------------------------------------------------------
    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or offset < 0:
            raise OSError(f"{self.path}: a growing file can only seek to an absolute offset")
        self._pos = offset  # resumable-upload recovery rewinds to what the server has committed
        if self._file is not None:
            self._file.seek(offset)
        return offset

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes, waiting for the writer as needed; fewer only at the end of the completed file."""
        parts: list[bytes] = []
        wanted = size if size is not None and size >= 0 else None
        while wanted is None or wanted > 0:
            if self._cancelled.is_set():
                raise StreamCancelled(f"{self.path}: upload cancelled before the window was complete")
            # Note completion *before* reading: a read that then comes back empty is the true end.
            complete = self._complete.is_set()
            data = self._open().read(wanted if wanted is not None else 1 << 24) if self._ready() else b""
            if data:
                parts.append(data)
                self._pos += len(data)
                if wanted is not None:
                    wanted -= len(data)
                continue
            if complete:
                if self._file is None:
                    raise FileNotFoundError(f"{self.path}: the window was completed but its file was never written")
                break
            self._cancelled.wait(self.poll_seconds)
        return b"".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _ready(self) -> bool:
        return self._file is not None or os.path.exists(self.path)

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # unbuffered: see the writer's appends at once
            self._file.seek(self._pos)
        return self._file
