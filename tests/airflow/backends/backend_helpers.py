"""Helpers for the host-backend tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SETUP_SSHD = HERE / "setup_sshd.sh"
FAKE_WORKER = HERE / "fake_worker.sh"
FAKE_DOCKER = HERE / "fake_docker.sh"
SSH_CONN_ID = "aifs_test_sshd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Hooks look connections up by id; give the Google hooks one that needs no credentials file.
os.environ.setdefault("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", '{"conn_type": "google_cloud_platform"}')


def need(reason: str):
    """Skip on a laptop, fail in CI: a missing prerequisite there is a broken pipeline, not a pass."""
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@dataclasses.dataclass(frozen=True)
class Sshd:
    host: str
    port: int
    user: str
    key: str
    pid_file: str

    @property
    def master_pid(self) -> int:
        return int(Path(self.pid_file).read_text().strip())

    def connection_json(self) -> str:
        import json

        return json.dumps(
            {
                "conn_type": "ssh",
                "host": self.host,
                "port": self.port,
                "login": self.user,
                "extra": {"key_file": self.key, "no_host_key_check": True, "look_for_keys": False},
            }
        )

    def kill_sessions(self) -> list[int]:
        """SIGKILL every per-connection sshd process (not the listener): all SSH sessions drop at once.

        Processes the sessions started but that left them (setsid'd jobs) are not sshd processes
        and are not touched: that is the point of the test.
        """
        master = self.master_pid
        children: dict[int, list[int]] = {}
        comm: dict[int, str] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
            comm[int(entry)] = name
        victims, todo = [], list(children.get(master, []))
        while todo:
            pid = todo.pop()
            if comm.get(pid) == "sshd":
                victims.append(pid)
                todo.extend(children.get(pid, []))
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return victims


class Log(list):
    """A LogSink that keeps the lines; thread-safe enough for list.append."""

    def __call__(self, line: str) -> None:
        self.append(line)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        self.wait_until(lambda lines: any(text in line for line in lines), timeout, what=repr(text))

    def wait_until(self, predicate, timeout: float = 20.0, what: str = "expected output") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self)):
                return
            time.sleep(0.02)
        raise AssertionError(f"{what} not logged within {timeout} s; log so far: {list(self)}")




@dataclasses.dataclass
class JobDir:
    """Read a job's host-side files directly (loopback: same filesystem)."""

    path: Path

    def launches(self) -> list[str]:
        f = self.path / "launches"
        return f.read_text().splitlines() if f.exists() else []

    def exit_code(self) -> int | None:
        f = self.path / "exit"
        return int(f.read_text()) if f.exists() else None

    def wait_exit(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return code
            time.sleep(0.05)
        raise AssertionError(f"job in {self.path} did not finish within {timeout} s")

    def pgid(self) -> int:
        return int((self.path / "pid").read_text())


def runs_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_pgid_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process group {pgid} still alive after {timeout} s")


def job_spans(times: Path) -> list[tuple[float, float | None, str]]:
    """(start, end or None, args) of each fake-worker process, from the times it recorded itself."""
    starts: dict[str, tuple[float, str]] = {}
    ends: dict[str, float] = {}
    for line in (times.read_text().splitlines() if times.exists() else []):
        what, when, pid, *args = line.split()
        if what == "start":
            starts[pid] = (float(when), " ".join(args))
        else:
            ends[pid] = float(when)
    return sorted((start, ends.get(pid), args) for pid, (start, args) in starts.items())


def assert_no_overlap(spans: list[tuple[float, float | None, str]]) -> None:
    assert all(end is not None for _, end, _ in spans), f"a job never ended: {spans}"
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        assert start >= end, f"two jobs held the GPU at once: {first!r} until {end}, {second!r} from {start}"
