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
from aifs.generations import DEFAULT_GENERATION, GENERATIONS
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


#: What each generation's image pins (ECMWF's and public deployments' versions: include/Dockerfile's
#: header), and the CUDA line of that torch's PyPI wheels, which the CUDA base must match.
IMAGE_PINS = {
    "v1": {"torch": "2.5.1", "flash_attn": "2.7.3", "cuda": "12.4", "anemoi-models": "0.6.0"},
    "v2": {"torch": "2.7.0", "flash_attn": "2.7.4", "cuda": "12.6", "anemoi-models": "0.11.2", "torch-geometric": "2.6.1"},
}


def test_gpu_image_builds_each_generation_from_one_arg_defaulting_to_the_operational_one():
    df = Stages(GPU)
    assert df.global_args["GENERATION"] == DEFAULT_GENERATION == "v2"
    # the generation picks its stages: every generation has a build and a runtime base, nothing else branches
    assert dict(df.stages)["python-build"][0].value[0] == "build-base-${GENERATION}"
    assert dict(df.stages)["worker"][0].value[0] == "runtime-base-${GENERATION}"
    assert {name for name, _ in df.stages if name.startswith(("build-base-", "runtime-base-"))} == {
        f"{side}-base-{g}" for g in GENERATIONS for side in ("build", "runtime")
    }
    venv = df.args("venv")  # empty: the generation's own
    assert venv["TORCH_VERSION"] == venv["FLASH_ATTN_VERSION"] == venv["TORCH_INDEX_URL"] == ""
    assert venv["ANEMOI_GRAPHS_VERSION"] == "", "anemoi-graphs 0.6.0 needs numpy<2; the worker pins numpy 2.x"


@pytest.mark.parametrize("name", sorted(IMAGE_PINS))
def test_gpu_image_pins_of_each_generation_load_its_checkpoint(name):
    df, generation, want = Stages(GPU), GENERATIONS[name], IMAGE_PINS[name]
    build, runtime = df.env(f"build-base-{name}"), df.env(f"runtime-base-{name}")
    assert build["AIFS_GENERATION"] == runtime["AIFS_GENERATION"] == name
    assert build["AIFS_TORCH"] == want["torch"] and build["AIFS_FLASH_ATTN"] == want["flash_attn"]
    # the torch wheels' CUDA line is the base's, on both sides
    for side in ("BUILD", "RUNTIME"):
        assert re.search(rf"nvidia/cuda:{re.escape(want['cuda'])}\.\d+-", df.global_args[f"{name.upper()}_{side}_IMAGE"])
    # the generation's own pinned requirements file, whose anemoi-models line unpickles its checkpoint
    assert build["AIFS_WORKER_REQUIREMENTS"] == generation.requirements
    worker = pins(REPO / generation.requirements)
    assert worker["anemoi-models"] == want["anemoi-models"] and generation.loads(worker["anemoi-models"])
    assert worker.get("torch-geometric") == want.get("torch-geometric")
    assert "anemoi-inference" in worker
    # its Hugging Face checkpoint, under the file name the worker knows, the same on both sides
    assert build["AIFS_DEFAULT_CHECKPOINT_REPO"] == generation.default_checkpoint
    assert build["AIFS_DEFAULT_CHECKPOINT_FILE"] == runtime["AIFS_DEFAULT_CHECKPOINT_FILE"] == KNOWN_HF_CHECKPOINTS[generation.default_checkpoint]
    if name == "v2":  # Triton compiles a kernel at first use: a C compiler and Python's headers at run time
        assert runtime["CC"] == "gcc" and {"gcc", "libc6-dev", "python${PYTHON_VERSION}-dev"} <= set(runtime["AIFS_RUNTIME_PACKAGES"].strip('"').split())
        assert any("${AIFS_RUNTIME_PACKAGES}" in r for r in df.runs("worker"))
        assert any('command -v "$CC"' in r and "Python.h" in r for r in df.runs("worker"))

    # the image installs the generation's own pins, with only its torch line swapped, plus the CPU steps' tools
    copies = [list(c.value) for c in df.stage("venv") if c.cmd == "COPY"]
    assert copies == [["requirements-worker.txt", "requirements-worker-v2.txt", "requirements-inputs.txt",
                       "requirements-products.txt", "/tmp/build/"]]
    grep = next(r for r in df.runs("venv") if "AIFS_WORKER_REQUIREMENTS" in r and "grep" in r)
    filtered = subprocess.run(  # the RUN's own filter, on the repository's files
        ["bash", "-c", grep.split("&&")[0].replace("> /tmp/build/requirements.txt", "").replace("/tmp/build/", f"{REPO}/")],
        capture_output=True, text=True, check=True, env={**os.environ, "AIFS_WORKER_REQUIREMENTS": generation.requirements},
    )
    original = (REPO / generation.requirements).read_text().splitlines()
    assert filtered.stdout.splitlines() == [line for line in original if not line.startswith("torch==")]
    assert "-c /tmp/torch-constraint.txt" in grep, "nothing may replace the image's torch"
    assert "-r /tmp/build/requirements-inputs.txt -r /tmp/build/requirements-products.txt" in grep


def test_gpu_image_runs_the_worker_as_a_non_root_user_with_the_baked_checkpoint():
    df = Stages(GPU)
    name, _ = df.stages[-1]
    assert name == "worker", "plain `docker build` must produce the worker image (the last stage)"
    args, env = df.args("worker"), df.env("worker")
    assert df.last("LABEL", "worker") and "aifs.generation" in df.last("LABEL", "worker").value
    assert args["AIFS_UID"] == str(hostcontract.WORKER_UID) != "0"
    assert df.last("USER", "worker").value[0] == "${AIFS_UID}:${AIFS_UID}"
    entry = df.last("ENTRYPOINT", "worker")
    assert entry.json and list(entry.value[-3:]) == ["python", "-m", "aifs.worker"]
    # the backends' default container entrypoint is `python -m aifs.worker`: python must be on PATH
    assert remote_job.job_settings_properties()["entrypoint"]["default"][0] == "python"
    assert env["PATH"].startswith("/opt/aifs/venv/bin:")
    # the checkpoint: by default the default generation's, the repo the DAG names by default, found offline both ways
    ckpt = df.args("checkpoint")
    assert ckpt["AIFS_CHECKPOINT_REPO"] == ckpt["AIFS_CHECKPOINT_FILE"] == "", "empty: the generation's own"
    default = df.env(f"build-base-{df.global_args['GENERATION']}")
    assert default["AIFS_DEFAULT_CHECKPOINT_REPO"] == layout.DEFAULT_CHECKPOINT
    assert default["AIFS_DEFAULT_CHECKPOINT_FILE"] == KNOWN_HF_CHECKPOINTS[layout.DEFAULT_CHECKPOINT]
    assert env["AIFS_CHECKPOINT"] == "/opt/aifs/checkpoints/${AIFS_DEFAULT_CHECKPOINT_FILE}"
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


def _worker_python(generation: str = "v1") -> str:
    """The worker environment of a generation: v1's is $AIFS_WORKER_PYTHON or .venv, v2's .venv-v2 (make env)."""
    local = str(REPO / GENERATIONS[generation].local_venv / "bin" / "python")
    for candidate in ((os.environ.get("AIFS_WORKER_PYTHON") if generation == "v1" else None), local):
        if candidate and os.path.isfile(candidate):
            return candidate
    pytest.fail(f"no {generation} worker environment: make env builds {GENERATIONS[generation].local_venv}")


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


@pytest.fixture(scope="module")
def tiny_checkpoints(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as each generation records it (v2: its recorded anemoi-models is 0.11.2; both stacks load it)."""
    from checkpoint_files import with_recorded_models

    return {"v1": tiny_checkpoint,
            "v2": with_recorded_models(tiny_checkpoint, tmp_path_factory.mktemp("ckpt-v2") / "tiny-v2.ckpt", "0.11.2")}


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


def _stage_runner(tmp: Path, df: Stages, stage: str, generation: str = DEFAULT_GENERATION, python: str | None = None):
    """Run a stage's RUN lines in bash as the build would for ``generation``: its ARGs and ENV (with its
    generation base's), `python` = that generation's worker environment (or ``python``), /opt/aifs moved
    under ``tmp``."""
    shim = tmp / "bin"
    shim.mkdir(exist_ok=True)
    # a wrapper, not a link: a venv is found from the path it was run by
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(python or _worker_python(generation))} "$@"\n')
    (shim / "python").chmod(0o755)
    base = f"{'runtime' if stage == 'worker' else 'build'}-base-{generation}"

    def run(command: str, **overrides: str) -> subprocess.CompletedProcess:
        env = _worker_env(**{**df.global_args, "GENERATION": generation, **df.args(stage)})
        for key, value in {**df.env(base), **df.env(stage)}.items():
            env[key] = value.replace("$PATH", "").rstrip(":") if key == "PATH" else value
        env.update(overrides)
        env["PATH"] = f"{shim}{os.pathsep}{os.environ['PATH']}"
        env = {k: v.replace("/opt/aifs", str(tmp / "opt-aifs")) for k, v in env.items()}
        command = (command.replace("/opt/aifs", str(tmp / "opt-aifs"))
                   .replace("/tmp/build/bake_checkpoint.py", str(REPO / "include" / "bake_checkpoint.py"))
                   .replace("/tmp/build/generations.py", str(REPO / "plugins" / "aifs" / "generations.py")))
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)

    return run


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_checkpoint_stage_bakes_each_generations_checkpoint_that_resolves_offline_both_ways(tmp_path, tiny_checkpoints, name):
    df, generation = Stages(GPU), GENERATIONS[name]
    tiny = tiny_checkpoints[name]
    base = df.env(f"build-base-{name}")
    repo, filename = base["AIFS_DEFAULT_CHECKPOINT_REPO"], base["AIFS_DEFAULT_CHECKPOINT_FILE"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    hf_home = tmp_path / "opt-aifs" / "hf"
    _hf_cache_with(hf_home, repo, filename, tiny, commit)
    run = _stage_runner(tmp_path, df, "checkpoint", name)
    bake_run, load_run = [r for r in df.runs("checkpoint")]

    # the build's bake step, pinned to a commit and with the file's SHA-256, offline (the cache has it)
    sha = hashlib.sha256(tiny.read_bytes()).hexdigest()
    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, AIFS_CHECKPOINT_SHA256=sha, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"commit: {commit}" in proc.stdout
    # it says which generation it found, and that this stack's anemoi-models loads it
    assert f"generation: {name} ({generation.model}; anemoi-models {IMAGE_PINS[name]['anemoi-models']})" in proc.stdout
    link = tmp_path / "opt-aifs" / "checkpoints" / filename
    assert link.is_symlink() and link.resolve().read_bytes() == tiny.read_bytes()

    # the build's CPU load of the model
    proc = run(load_run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoint loads:" in proc.stdout

    # at run time: what the DAG passes for this generation (the repo id) resolves offline to the baked
    # file, exactly as anemoi-inference asks for it (hf_hub_download(repo_id, filename), revision main)
    probe = (
        "import json; from aifs.worker.model import resolve_checkpoint; from huggingface_hub import hf_hub_download; "
        f"src = resolve_checkpoint({generation.default_checkpoint!r}); print(hf_hub_download(**src['huggingface']))"
    )
    proc = subprocess.run([_worker_python(name), "-c", probe], capture_output=True, text=True, timeout=120,
                          env=_worker_env(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).resolve() == link.resolve()


def test_checkpoint_stage_refuses_another_generations_checkpoint_or_one_its_stack_cannot_load(tmp_path, tiny_checkpoints):
    df = Stages(GPU)
    base = df.env("build-base-v2")
    commit = "00112233445566778899aabbccddeeff00112233"
    hf_home = tmp_path / "opt-aifs" / "hf"
    bake_run = df.runs("checkpoint")[0]

    # a v1 checkpoint where the v2 image expects its own
    _hf_cache_with(hf_home, base["AIFS_DEFAULT_CHECKPOINT_REPO"], base["AIFS_DEFAULT_CHECKPOINT_FILE"], tiny_checkpoints["v1"], commit)
    proc = _stage_runner(tmp_path, df, "checkpoint", "v2")(bake_run, AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0 and "build it with GENERATION=v1" in proc.stderr + proc.stdout

    # the v2 checkpoint in a v2 image whose stack is v1's (anemoi-models 0.6.0)
    repo = "team/aifs-v2-copy"
    _hf_cache_with(hf_home, repo, "model.ckpt", tiny_checkpoints["v2"], commit)
    proc = _stage_runner(tmp_path, df, "checkpoint", "v2", python=_worker_python("v1"))(
        bake_run, AIFS_CHECKPOINT_REPO=repo, AIFS_CHECKPOINT_FILE="model.ckpt", AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0
    assert "needs anemoi-models 0.11.x (generation v2); this image has anemoi-models 0.6.0, which cannot load it" in proc.stderr + proc.stdout


def test_checkpoint_stage_refuses_a_wrong_file(tmp_path, tiny_checkpoint):
    df = Stages(GPU)
    base = df.env(f"build-base-{DEFAULT_GENERATION}")
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    hf_home = tmp_path / "opt-aifs" / "hf"
    bad = tmp_path / "error-page.html"
    bad.write_text("<html>429 Too Many Requests</html>")
    _hf_cache_with(hf_home, base["AIFS_DEFAULT_CHECKPOINT_REPO"], base["AIFS_DEFAULT_CHECKPOINT_FILE"], bad, commit)
    run = _stage_runner(tmp_path, df, "checkpoint")
    bake_run = df.runs("checkpoint")[0]

    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1")
    assert proc.returncode != 0 and "is not an anemoi checkpoint" in proc.stderr + proc.stdout
    proc = run(bake_run, AIFS_CHECKPOINT_REVISION=commit, HF_HUB_OFFLINE="1", AIFS_CHECKPOINT_SHA256="0" * 64)
    assert proc.returncode != 0 and "SHA-256" in proc.stderr + proc.stdout


@pytest.mark.parametrize("name", sorted(GENERATIONS))
def test_final_stage_self_check_passes_in_the_worker_environment(tmp_path, tiny_checkpoints, name):
    df = Stages(GPU)
    filename = df.env(f"runtime-base-{name}")["AIFS_DEFAULT_CHECKPOINT_FILE"]
    target = tmp_path / "opt-aifs" / "checkpoints" / filename
    target.parent.mkdir(parents=True)
    target.symlink_to(tiny_checkpoints[name])
    run = _stage_runner(tmp_path, df, "worker", name)
    check = next(r for r in df.runs("worker") if "aifs.worker --help" in r)
    env_ckpt = df.env("worker")["AIFS_CHECKPOINT"].replace("${AIFS_DEFAULT_CHECKPOINT_FILE}", filename)
    proc = run(check, AIFS_CHECKPOINT=env_ckpt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    target.unlink()
    proc = run(check, AIFS_CHECKPOINT=env_ckpt)
    assert proc.returncode != 0, "the self-check must fail when the checkpoint is missing"
