"""Fixtures for the host-backend tests: a real key-only sshd on loopback, a fake worker, helpers.

The sshd comes from setup_sshd.sh (CI's .ci/run calls it as root first; here it is called again,
which is a no-op when the server already answers). Without one the ssh tests skip locally and
FAIL in CI (CI=true): they are the proof that members survive dropped sessions.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .backend_helpers import SETUP_SSHD, SSH_CONN_ID, Log, Sshd, need


@pytest.fixture(scope="session")
def sshd() -> Sshd:
    directory = os.environ.get("AIFS_SSHD_DIR", "/tmp/aifs-sshd")
    env = dict(os.environ, AIFS_SSHD_DIR=directory)
    try:
        done = subprocess.run(["bash", str(SETUP_SSHD)], env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        need(f"no test sshd ({exc})")
    if done.returncode != 0:
        need(f"no test sshd: {SETUP_SSHD.name} failed: {(done.stdout + done.stderr)[-2000:]}")
    facts = dict(
        line.split("=", 1) for line in Path(directory, "conn.env").read_text().splitlines() if "=" in line
    )
    server = Sshd(
        host=facts["AIFS_SSHD_HOST"],
        port=int(facts["AIFS_SSHD_PORT"]),
        user=facts["AIFS_SSHD_USER"],
        key=facts["AIFS_SSHD_KEY"],
        pid_file=facts["AIFS_SSHD_PID_FILE"],
    )
    os.environ[f"AIRFLOW_CONN_{SSH_CONN_ID.upper()}"] = server.connection_json()
    return server


@pytest.fixture
def log() -> Log:
    return Log()
