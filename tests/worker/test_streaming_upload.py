"""Windows stream into the bucket while they are written (real emulator, real client, small chunks).

The worker's O48 windows are smaller than one 32 MiB chunk, so here the chunk size is cut to the
smallest GCS allows (256 KiB) and a thread plays the GRIB writer, appending to the window file.
Its bytes are random, not GRIB, so these uploaders do not index the windows (``index_windows=False``;
the index is tested on real windows in test_grib_index.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from aifs.layout import Window
from aifs.worker import storage
from aifs.worker.errors import UploadFailed
from aifs.worker.growing import GrowingFile, StreamCancelled
from aifs.worker.uploader import WindowUploader

CHUNK = 256 * 1024
WINDOW = Window(0, 72)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(storage, "UPLOAD_CHUNK_BYTES", CHUNK)


class Appender:
    """Appends ``pieces`` random blocks to ``path`` from a thread, flushing each as a GRIB writer would."""

    def __init__(self, path: str, pieces: int, piece_bytes: int = 100_000):
        self.path, self.pieces, self.piece_bytes = path, pieces, piece_bytes
        self.written = bytearray()
        self.go_on = threading.Event()
        self.go_on.set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with open(self.path, "wb") as f:
            for _ in range(self.pieces):
                self.go_on.wait()
                data = os.urandom(self.piece_bytes)
                f.write(data)
                f.flush()
                self.written += data
                time.sleep(0.01)

    def start(self) -> "Appender":
        self.thread.start()
        return self

    def join(self) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def _wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_window_is_streamed_while_written_and_appears_only_once_complete(bucket, tmp_path):
    local = str(tmp_path / "window.grib")
    name = "20250601_0000/forecast/window.grib"
    uploader = WindowUploader(bucket, member=7, threads=2, deadline=30, index_windows=False)
    try:
        upload = uploader.open_window(local, name, WINDOW)  # before the file exists, as the writer does
        writer = Appender(local, pieces=14).start()  # 1.4 MB: five whole chunks and a short one
        writer.join()
        size = len(writer.written)
        whole_chunks = size // CHUNK * CHUNK
        # every whole chunk leaves before the window is closed: closing leaves only the short one
        assert _wait_for(lambda: upload.stream.tell() >= whole_chunks), (upload.stream.tell(), whole_chunks)
        assert bucket.get_blob(name) is None, "an object appeared before its window was complete"

        upload.complete(messages=14)
        [obj] = uploader.wait()
    finally:
        uploader.shutdown()
    assert (obj.name, obj.size, obj.messages, obj.window) == (name, size, 14, (0, 72))
    assert bucket.blob(name).download_as_bytes() == bytes(writer.written)
    assert obj.crc32c == bucket.get_blob(name).crc32c
    assert not os.path.exists(local), "the verified window was not deleted locally"


def test_window_of_exactly_whole_chunks(bucket, tmp_path):
    """The last read is then empty: the library closes the object with an empty final chunk."""
    local = str(tmp_path / "window.grib")
    name = "exact/window.grib"
    uploader = WindowUploader(bucket, member=1, threads=1, deadline=30, index_windows=False)
    try:
        upload = uploader.open_window(local, name, WINDOW)
        writer = Appender(local, pieces=2, piece_bytes=CHUNK).start()
        writer.join()
        assert _wait_for(lambda: upload.stream.tell() == 2 * CHUNK)
        upload.complete(messages=2)
        [obj] = uploader.wait()
    finally:
        uploader.shutdown()
    assert obj.size == 2 * CHUNK
    assert bucket.blob(name).download_as_bytes() == bytes(writer.written)


def test_cancelled_window_never_appears_in_the_bucket(bucket, tmp_path):
    """A member that fails mid-window: the half-sent upload is never finalized, so no object at all."""
    local = str(tmp_path / "window.grib")
    name = "cancelled/window.grib"
    uploader = WindowUploader(bucket, member=3, threads=2, deadline=30)
    upload = uploader.open_window(local, name, WINDOW)
    writer = Appender(local, pieces=14).start()
    writer.join()
    assert _wait_for(lambda: upload.stream.tell() >= 2 * CHUNK), "nothing was streamed"
    uploader.shutdown()  # what the cycle does when the member fails: the window is never completed
    with pytest.raises(UploadFailed, match="cancelled before the window was complete") as failure:
        uploader.raise_if_failed()
    assert isinstance(failure.value.__cause__, StreamCancelled)
    assert bucket.get_blob(name) is None
    assert list(bucket.list_blobs()) == []
    assert os.path.exists(local), "the uploader deleted a window it never verified (the cycle's cleanup does that)"


def test_growing_file_reads_block_until_whole_or_complete(tmp_path):
    path = str(tmp_path / "g.bin")
    stream = GrowingFile(path, poll_seconds=0.01)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.read(10)), daemon=True)
    reader.start()
    with open(path, "wb", buffering=0) as f:
        f.write(b"abcd")
        time.sleep(0.1)
        assert reader.is_alive(), "a read returned short before the file was complete"
        f.write(b"efghijkl")
    reader.join(timeout=5)
    assert got == [b"abcdefghij"] and stream.tell() == 10

    stream.complete()
    assert stream.read(10) == b"kl"  # the short read that ends the upload, only once complete
    assert stream.read(10) == b""
    stream.seek(4)  # resumable-upload recovery rewinds to the server's committed offset
    assert stream.read(3) == b"efg"
    stream.close()


def test_growing_file_cancel_interrupts_a_waiting_read(tmp_path):
    stream = GrowingFile(str(tmp_path / "never-written.bin"), poll_seconds=0.01)
    errors: list[BaseException] = []

    def read():
        try:
            stream.read(10)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.05)
    stream.cancel()
    reader.join(timeout=5)
    assert len(errors) == 1 and isinstance(errors[0], StreamCancelled)


def test_completed_window_whose_file_never_appeared_is_an_error(tmp_path):
    stream = GrowingFile(str(tmp_path / "missing.bin"))
    stream.complete()
    with pytest.raises(FileNotFoundError, match="never written"):
        stream.read(10)


class DroppingProxy:
    """A TCP proxy on loopback in front of the emulator that can drop a connection on cue.

    Once armed, the next bytes any client sends are not forwarded: that connection is cut, as a
    flaky network would, and the client has to notice and send its request again.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = threading.Event()
        self.drops = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if from_client and self.armed.is_set():
                    self.armed.clear()
                    self.drops += 1
                    break  # the request never reaches the bucket
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_connection_dropped_mid_window_is_retried_and_the_window_completes(emulator, tmp_path):
    from aifs.testing.emulator import anonymous_client

    proxy = DroppingProxy(int(emulator.url.rsplit(":", 1)[1]))
    bucket = anonymous_client(proxy.url).create_bucket("flaky-network")
    local = str(tmp_path / "window.grib")
    name = "flaky/window.grib"
    uploader = WindowUploader(bucket, member=4, threads=2, deadline=30, index_windows=False)
    written = os.urandom(3 * CHUNK)
    try:
        upload = uploader.open_window(local, name, WINDOW)
        with open(local, "wb") as f:  # the test plays the GRIB writer
            f.write(written[: CHUNK * 3 // 2])
            f.flush()
            # the upload reads on into the second chunk only once the first one's request is answered
            assert _wait_for(lambda: upload.stream.tell() > CHUNK), upload.stream.tell()
            proxy.armed.set()  # so the second chunk's request is the one cut off
            f.write(written[CHUNK * 3 // 2:])
        upload.complete(messages=4)
        [obj] = uploader.wait()
    finally:
        uploader.shutdown()
        proxy.close()
    assert proxy.drops == 1, "the proxy never dropped a connection: nothing was tested"
    assert obj.size == 3 * CHUNK
    assert bucket.blob(name).download_as_bytes() == written


def test_stale_file_under_the_window_name_is_not_streamed(bucket, tmp_path):
    local = tmp_path / "window.grib"
    local.write_bytes(b"stale bytes of an earlier, crashed attempt" * 10_000)
    name = "stale/window.grib"
    uploader = WindowUploader(bucket, member=2, threads=2, deadline=30, index_windows=False)
    try:
        upload = uploader.open_window(str(local), name, WINDOW)
        assert not local.exists(), "a stale file was left where the upload would stream it"
        time.sleep(0.5)  # the upload session is open and waiting before the writer starts
        writer = Appender(str(local), pieces=3).start()
        writer.join()
        upload.complete(messages=3)
        [obj] = uploader.wait()
    finally:
        uploader.shutdown()
    assert obj.size == len(writer.written)
    assert bucket.blob(name).download_as_bytes() == bytes(writer.written)


def test_unexpected_upload_error_mid_forecast_is_an_upload_failure(run_main, client, bucket, slow_checkpoint, dirs,
                                                                   monkeypatch):
    """E.g. google-cloud-storage's ValueError when a bucket commits part of a chunk: exit 13, not 12."""
    from worker_helpers import manifest_names, seed, worker_args

    from aifs.exitcodes import ExitCode

    def partial_commit(*args, **kwargs):
        raise ValueError("Bytes stream is in unexpected state. The local stream has had 262144 bytes read from it "
                         "while 131072 bytes have already been updated (they should match).")

    monkeypatch.setattr(storage, "upload_verified", partial_commit)
    seed(bucket, slow_checkpoint, [1])
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=slow_checkpoint, dirs=dirs, members="1",
                                      lead_time=150))
    assert code == ExitCode.UPLOAD_FAILED, text[-3000:]
    assert "upload crashed: ValueError" in text
    assert "inference failed" not in text.lower()
    assert manifest_names(client, bucket.name) == []
    assert dirs.files() == []
