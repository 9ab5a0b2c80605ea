"""The worker image (include/Dockerfile), its CPU variant for the local stack (include/Dockerfile.cpu)
and the Cloud Build config: parsed with BuildKit's own parser (the ``dockerfile`` package), checked
against the pins and contracts they must agree with, and the image's build-time Python steps run
for real in the worker environment (no Docker engine here).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
from pathlib import Path

import dockerfile
import pytest
import yaml

from aifs import hostcontract, layout
from aifs.orchestration.backends import remote_job
from aifs.worker.model import KNOWN_HF_CHECKPOINTS

REPO = Path(__file__).resolve().parents[3]
GPU = REPO / "include" / "Dockerfile"
CPU = REPO / "include" / "Dockerfile.cpu"
CLOUDBUILD = REPO / "include" / "cloudbuild.yaml"


class Stages:
    """A Dockerfile as global ARGs plus stages of commands."""

    def __init__(self, path: Path):
        self.path = path
        self.commands = dockerfile.parse_file(str(path))
        self.global_args: dict[str, str] = {}
        self.stages: list[tuple[str, list]] = []
        for c in self.commands:
            if c.cmd == "FROM":
                name = c.value[2] if len(c.value) >= 3 and c.value[1].upper() == "AS" else str(len(self.stages))
                self.stages.append((name, [c]))
            elif not self.stages:
                assert c.cmd == "ARG", f"{path}:{c.start_line}: only ARG may precede FROM"
                key, _, default = c.value[0].partition("=")
                self.global_args[key] = default
            else:
                self.stages[-1][1].append(c)

    def stage(self, name: str) -> list:
        return dict(self.stages)[name]

    def args(self, name: str) -> dict[str, str]:
        """ARG defaults visible in a stage (a bare ``ARG X`` takes the global default)."""
        out = {}
        for c in self.stage(name):
            if c.cmd == "ARG":
                key, eq, default = c.value[0].partition("=")
                out[key] = default if eq else self.global_args.get(key, "")
        return out

    def env(self, name: str) -> dict[str, str]:
        out = {}
        for c in self.stage(name):
            if c.cmd == "ENV":
                out.update(zip(c.value[0::2], c.value[1::2]))
        return out

    def runs(self, name: str) -> list[str]:
        return [c.value[0] for c in self.stage(name) if c.cmd == "RUN"]

    def last(self, cmd: str, name: str):
        found = [c for c in self.stage(name) if c.cmd == cmd]
        return found[-1] if found else None


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def dockerignore_includes(ignore_file: Path, rel: str) -> bool:
    """BuildKit .dockerignore semantics, enough for our files: last matching pattern wins, ``**`` spans dirs."""
    included = True
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        regex = "".join(
            ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            for part in re.split(r"(\*\*)", pattern.strip("/"))
        )
        parts = rel.split("/")
        # a pattern matches the path itself or any directory above it
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            included = negate
    return included


# -- the GPU worker image --------------------------------------------------------------------------


def test_gpu_image_versions_are_the_ones_that_load_aifs_ens_1_0():
    df = Stages(GPU)
    venv = df.args("venv")
    assert venv["TORCH_VERSION"] == "2.5.1"
    assert venv["FLASH_ATTN_VERSION"] == "2.7.3"
    assert venv["ANEMOI_GRAPHS_VERSION"] == "", "anemoi-graphs 0.6.0 needs numpy<2; the worker pins numpy 2.x"
    # torch 2.5.1's PyPI wheels are CUDA 12.4 builds: the CUDA base must be 12.4
    assert re.fullmatch(r"12\.4\.\d+", df.global_args["CUDA_VERSION"])
    assert venv["TORCH_INDEX_URL"] == "", "torch from PyPI (its cu124 wheels)"
    worker = pins(REPO / "requirements-worker.txt")
    assert worker["anemoi-models"] == "0.6.0", "the checkpoint is a pickled anemoi-models 0.6 module"
    assert "anemoi-inference" in worker
    # the image installs the worker's own pins, with only its torch line swapped
    copies = [c.value for c in df.stage("venv") if c.cmd == "COPY"]
    assert ("requirements-worker.txt", "/tmp/build/requirements-worker.txt") in copies
    grep = next(r for r in df.runs("venv") if "requirements-worker.txt" in r and "grep" in r)
    filtered = subprocess.run(
        ["bash", "-c", grep.split("&&")[0].replace("/tmp/build/requirements-worker.txt", str(REPO / "requirements-worker.txt"))
         .replace("> /tmp/build/requirements.txt", "")],
        capture_output=True, text=True, check=True,
    ).stdout
    original = (REPO / "requirements-worker.txt").read_text().splitlines()
    assert filtered.splitlines() == [line for line in original if not line.startswith("torch==")]
    assert "-c /tmp/torch-constraint.txt" in grep, "nothing may replace the image's torch"


def test_gpu_image_runs_the_worker_as_a_non_root_user_with_the_baked_checkpoint():
    df = Stages(GPU)
    name, _ = df.stages[-1]
    assert name == "worker", "plain `docker build` must produce the worker image (the last stage)"
    args, env = df.args("worker"), df.env("worker")
    assert args["AIFS_UID"] == str(hostcontract.WORKER_UID) != "0"
    assert df.last("USER", "worker").value[0] == "${AIFS_UID}:${AIFS_UID}"
    entry = df.last("ENTRYPOINT", "worker")
    assert entry.json and list(entry.value[-3:]) == ["python", "-m", "aifs.worker"]
    # the backends' default container entrypoint is `python -m aifs.worker`: python must be on PATH
    assert remote_job.job_settings_properties()["entrypoint"]["default"][0] == "python"
    assert env["PATH"].startswith("/opt/aifs/venv/bin:")
    # the checkpoint: baked from the repo the DAG names by default, found offline both ways
    ckpt = df.args("checkpoint")
    assert ckpt["AIFS_CHECKPOINT_REPO"] == layout.DEFAULT_CHECKPOINT
    assert ckpt["AIFS_CHECKPOINT_FILE"] == KNOWN_HF_CHECKPOINTS[layout.DEFAULT_CHECKPOINT] == args["AIFS_CHECKPOINT_FILE"]
    assert env["AIFS_CHECKPOINT"] == "/opt/aifs/checkpoints/${AIFS_CHECKPOINT_FILE}"
    assert env["HF_HOME"] == df.env("checkpoint")["HF_HOME"]
    assert env["HF_HUB_OFFLINE"] == "1"
    copied = {c.value[0] for c in df.stage("worker") if c.cmd == "COPY" and "--from=checkpoint" in c.flags}
    assert copied == {"/opt/aifs/hf", "/opt/aifs/checkpoints"}
    # the scratch dirs the worker writes by default exist in the image, owned by that user
    assert any(layout.DEFAULT_INPUT_DIR in r and layout.DEFAULT_OUTPUT_DIR in r and "-o aifs" in r for r in df.runs("worker"))


@pytest.mark.parametrize("path", [GPU, CPU], ids=["Dockerfile", "Dockerfile.cpu"])
def test_everything_copied_is_in_the_build_context(path):
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name}: without it the context is the whole repo, virtualenvs included"
    assert not dockerignore_includes(ignore, ".venv/bin/python") and not dockerignore_includes(ignore, ".venv-airflow/x")
    copies = [c for c in Stages(path).commands if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)]
    assert copies
    for c in copies:
        for src in c.value[:-1]:
            assert (REPO / src).exists(), f"{path.name}:{c.start_line}: {src} does not exist"
            files = [p for p in (REPO / src).rglob("*.py")] if (REPO / src).is_dir() else [REPO / src]
            for f in files:
                if "__pycache__" not in f.parts:
                    rel = f.relative_to(REPO).as_posix()
                    assert dockerignore_includes(ignore, rel), f"{path.name}:{c.start_line}: {rel} is excluded by {ignore.name}"


def test_cpu_variant_is_airflow_plus_requirements_plus_a_cpu_worker():
    df = Stages(CPU)
    (name, commands), = df.stages
    assert commands[0].value[0] == "apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}"
    airflow_pin = pins(REPO / "requirements-airflow-local.txt")["apache-airflow"]
    assert df.global_args["AIRFLOW_VERSION"] == airflow_pin
    assert df.global_args["PYTHON_VERSION"] == "3.11"
    runs = df.runs(name)
    assert any('"apache-airflow==${AIRFLOW_VERSION}" -r /tmp/aifs/requirements.txt' in r for r in runs)
    # the worker environment: the torch the worker's tests use (CPU build), the worker's pins
    args = df.args(name)
    assert args["TORCH_VERSION"] == pins(REPO / "requirements-worker.txt")["torch"].split("+")[0]
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    venv_run = next(r for r in runs if "python -m venv /opt/aifs/worker-venv" in r)
    assert "-r /tmp/aifs/requirements-worker-cpu.txt" in venv_run and "-c /tmp/aifs/torch-constraint.txt" in venv_run
    assert df.env(name)["AIFS_WORKER_PYTHON"] == "/opt/aifs/worker-venv/bin/python"


def test_cloudbuild_builds_this_dockerfile_with_its_own_defaults():
    build = yaml.safe_load(CLOUDBUILD.read_text())
    (step,) = build["steps"]
    assert step["name"] == "gcr.io/cloud-builders/docker" and step["args"][0] == "build"
    assert "--file=include/Dockerfile" in step["args"] and step["args"][-1] == "."
    df = Stages(GPU)
    declared = {**df.global_args}
    for stage, _ in df.stages:
        declared.update(df.args(stage))
    subs = build["substitutions"]
    for arg in step["args"]:
        if arg.startswith("--build-arg="):
            key, _, value = arg[len("--build-arg="):].partition("=")
            assert key in declared, f"cloudbuild passes {key}, which the Dockerfile does not declare"
            sub = re.fullmatch(r"\$\{(_[A-Z0-9_]+)\}", value)
            assert sub and str(subs[sub.group(1)]) == declared[key], f"{key}: cloudbuild default {subs.get(sub.group(1) if sub else '')!r} != Dockerfile {declared[key]!r}"
    used = set(re.findall(r"\$\{(_[A-Z0-9_]+)\}", CLOUDBUILD.read_text()))
    assert used <= set(subs), f"undefined substitutions: {used - set(subs)}"
    tag = next(a for a in step["args"] if a.startswith("--tag="))[len("--tag="):]
    assert build["images"] == [tag] and tag.startswith("${_REGION}-docker.pkg.dev/${PROJECT_ID}/")
    assert int(build["timeout"].rstrip("s")) >= 3600 and build["options"]["diskSizeGb"] >= 100


def test_the_worker_cli_takes_its_default_checkpoint_from_the_image():
    worker_python = _worker_python()
    proc = subprocess.run(
        [worker_python, "-m", "aifs.worker", "--help"],
        env={**_worker_env(), "AIFS_CHECKPOINT": "/opt/aifs/checkpoints/baked.ckpt"},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "/opt/aifs/checkpoints/baked.ckpt" in proc.stdout


# -- the image's build steps, run for real ------------------------------------------------------


def _worker_python() -> str:
    for candidate in (os.environ.get("AIFS_WORKER_PYTHON"), str(REPO / ".venv" / "bin" / "python")):
        if candidate and os.path.isfile(candidate):
            return candidate
    pytest.fail("no worker environment: make env (or set AIFS_WORKER_PYTHON)")


def _worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "AIRFLOW", "PYTHON"))}
    env["PYTHONPATH"] = str(REPO / "plugins")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    proc = subprocess.run([_worker_python(), "-m", "aifs.testing", "checkpoint", "--grid", "O48", "--out", str(out)],
                          env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _hf_cache_with(hf_home: Path, repo: str, filename: str, source: Path, commit: str) -> None:
    """The cache as hf_hub_download(revision=commit) leaves it: blob, snapshot link, no refs/main."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    data = source.read_bytes()
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _stage_runner(tmp: Path, df: Stages, stage: str):
    """Run a stage's RUN lines in bash as the build would: its ARGs and ENV, `python` = the worker
    environment's, /opt/aifs moved under ``tmp``."""
    shim = tmp / "bin"
    shim.mkdir(exist_ok=True)
    if not (shim / "python").exists():  # a wrapper, not a link: a venv is found from the path it was run by
        (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(_worker_python())} "$@"\n')
        (shim / "python").chmod(0o755)

    def run(command: str, **overrides: str) -> subprocess.CompletedProcess:
        env = _worker_env(**df.args(stage))
        for key, value in df.env(stage).items():
            env[key] = value.replace("$PATH", "").rstrip(":") if key == "PATH" else value
        env.update(overrides)
        env["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
        env = {k: v.replace("/opt/aifs", str(tmp / "opt-aifs")) for k, v in env.items()}
        command = command.replace("/opt/aifs", str(tmp / "opt-aifs")).replace("/tmp/build/bake_checkpoint.py",
                                                                               str(REPO / "include" / "bake_checkpoint.py"))
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)

    return run


def test_checkpoint_stage_bakes_a_checkpoint_that_resolves_offline_both_ways(tmp_path, tiny_checkpoint):
    df = Stages(GPU)
    args = df.args("checkpoint")
    repo, filename = args["AIFS_CHECKPOINT_REPO"], args["AIFS_CHECKPOINT_FILE"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / "opt-aifs" / "hf"
    _hf_cache_with(hf_home, repo, filename, tiny_checkpoint, commit)
    run = _stage_runner(tmp_path, df, "checkpoint")
    bake_run, load_run = [r for r in df.runs("checkpoint")]

    # the build's bake step, pinned to a commit and with the file's SHA-256, offline (the cache has it)
    sha = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, AIFS_CHECKPOINT_SHA256=sha, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"commit: {commit}" in proc.stdout
    link = tmp_path / "opt-aifs" / "checkpoints" / filename
    assert link.is_symlink() and link.resolve().read_bytes() == tiny_checkpoint.read_bytes()

    # the build's CPU load of the model
    proc = run(load_run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoint loads:" in proc.stdout

    # at run time: what the DAG passes by default (the repo id) resolves offline to the baked file,
    # exactly as anemoi-inference asks for it (hf_hub_download(repo_id, filename), revision main)
    probe = (
        "import json; from aifs.worker.model import resolve_checkpoint; from huggingface_hub import hf_hub_download; "
        f"src = resolve_checkpoint({layout.DEFAULT_CHECKPOINT!r}); print(hf_hub_download(**src['huggingface']))"
    )
    proc = subprocess.run([_worker_python(), "-c", probe], capture_output=True, text=True, timeout=120,
                          env=_worker_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).resolve() == link.resolve()


def test_checkpoint_stage_refuses_a_wrong_file(tmp_path, tiny_checkpoint):
    df = Stages(GPU)
    args = df.args("checkpoint")
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    hf_home = tmp_path / "opt-aifs" / "hf"
    bad = tmp_path / "error-page.html"
    bad.write_text("<html>429 Too Many Requests</html>")
    _hf_cache_with(hf_home, args["AIFS_CHECKPOINT_REPO"], args["AIFS_CHECKPOINT_FILE"], bad, commit)
    run = _stage_runner(tmp_path, df, "checkpoint")
    bake_run = df.runs("checkpoint")[0]

    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0 and "is not an anemoi checkpoint" in proc.stderr + proc.stdout
    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1", AIFS_CHECKPOINT_SHA256="0" * 64)
    assert proc.returncode != 0 and "SHA-256" in proc.stderr + proc.stdout


def test_final_stage_self_check_passes_in_the_worker_environment(tmp_path, tiny_checkpoint):
    df = Stages(GPU)
    target = tmp_path / "opt-aifs" / "checkpoints" / "aifs-ens-crps-1.0.ckpt"
    target.parent.mkdir(parents=True)
    target.symlink_to(tiny_checkpoint)
    run = _stage_runner(tmp_path, df, "worker")
    check = next(r for r in df.runs("worker") if "aifs.worker --help" in r)
    env_ckpt = df.env("worker")["AIFS_CHECKPOINT"].replace("${AIFS_CHECKPOINT_FILE}", df.args("worker")["AIFS_CHECKPOINT_FILE"])
    proc = run(check, AIFS_CHECKPOINT=env_ckpt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target.unlink()
    proc = run(check, AIFS_CHECKPOINT=env_ckpt)
    assert proc.returncode != 0, "the self-check must fail when the checkpoint is missing"
