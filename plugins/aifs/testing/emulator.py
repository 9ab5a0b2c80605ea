"""A real GCS emulator process (gcp-storage-emulator) on loopback, for tests and the demo.

The real google-cloud-storage client talks to it over HTTP once ``STORAGE_EMULATOR_HOST`` is
set. Known gaps (design.md): it ignores generation preconditions and upload checksums and has
no XML multipart API, so correctness is always checked by reading objects back.

Run as a program to keep one in the foreground: ``python -m aifs.testing.emulator --port 9023``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable() -> list[str]:
    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if not exe:
        raise RuntimeError("gcp-storage-emulator is not installed in this environment (pip install gcp-storage-emulator)")
    return [exe]


class StorageEmulator:
    """Start/stop one emulator process; ``url`` is what STORAGE_EMULATOR_HOST must be."""

    def __init__(self, port: int | None = None, data_dir: str | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.data_dir = data_dir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "StorageEmulator":
        if self.data_dir:
            os.makedirs(self.data_dir, exist_ok=True)
        # -d belongs to the program, before the subcommand; without it, keep everything in memory
        cmd = _executable() + (["-d", self.data_dir] if self.data_dir else [])
        cmd += ["start", "--host=127.0.0.1", f"--port={self.port}", "--quiet"] + ([] if self.data_dir else ["--in-memory"])
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {self.process.returncode} (log: {self.log_path})")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not answer on {self.url} within {timeout:.0f} s")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang, as when a bucket stops answering."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGCONT)
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "StorageEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def anonymous_client(url: str, project: str = "test"):
    """A google-cloud-storage client pointed at an emulator (no credentials needed)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9023)
    parser.add_argument("--data-dir", default=None, help="persist objects here (default: in memory)")
    args = parser.parse_args(argv)
    # the server runs in a session of its own; take it down with us on SIGTERM as on Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    with StorageEmulator(args.port, args.data_dir) as emu:
        print(f"STORAGE_EMULATOR_HOST={emu.url}", flush=True)
        try:
            emu.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
