"""Bake the AIFS-ENS checkpoint into the worker image at build time (include/Dockerfile runs it).

    python bake_checkpoint.py --repo ecmwf/aifs-ens-2.0 --filename aifs-ens-crps-2.0.ckpt \
        --revision main --link /opt/aifs/checkpoints/aifs-ens-crps-2.0.ckpt [--sha256 HEX] \
        [--generation v2 --generations-module /tmp/build/generations.py]

The file lands in the Hugging Face cache of the image ($HF_HOME), and ``--link`` points at it, so
both ways a run can name the checkpoint work with no download at run time (the image sets
HF_HUB_OFFLINE=1, so a miss fails at once instead of fetching 1 GB per member):

* a path: ``--checkpoint /opt/aifs/checkpoints/...`` or the image's $AIFS_CHECKPOINT default;
* the repo id the DAG passes by default, ``ecmwf/aifs-ens-1.0``: anemoi-inference calls
  ``hf_hub_download(repo_id, filename)`` for it, which resolves ``refs/main`` in the cache. This
  script points ``refs/main`` at the snapshot it baked, also when ``--revision`` pins a commit.

Then it checks the file: the optional SHA-256, that anemoi's checkpoint metadata reads, and which
generation the checkpoint records (aifs.generations: the anemoi-models release line it was trained
with). It prints that generation and fails the build when it is not the image's (``--generation``)
or when the anemoi-models installed here cannot load it: an image never carries a checkpoint its
own stack cannot unpickle.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from importlib import metadata as importlib_metadata
from pathlib import Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def point_main_at_snapshot(snapshot_file: Path) -> str:
    """Write ``refs/main`` = the commit of ``.../snapshots/<commit>/<file>``; returns that commit."""
    commit_dir = snapshot_file.parent
    while commit_dir.parent.name != "snapshots":
        commit_dir = commit_dir.parent  # filenames may contain sub-directories
    commit = commit_dir.name
    refs = commit_dir.parent.parent / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(commit)
    return commit


def load_generations(module_path: Path | None):
    """aifs.generations: installed, or the file the build copied (the checkpoint stage has no aifs package)."""
    if module_path is None:
        import aifs.generations as generations

        return generations
    spec = importlib.util.spec_from_file_location("aifs_generations", module_path)
    generations = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generations  # dataclasses resolve their module by name
    spec.loader.exec_module(generations)
    return generations


def check_generation(metadata: dict, checkpoint: str, expected: str | None, generations) -> dict[str, str]:
    """The checkpoint's generation; SystemExit when it is not ``expected`` or this stack cannot load it."""
    try:
        found = generations.generation_of(metadata, checkpoint)
    except generations.UnsupportedCheckpoint as exc:
        raise SystemExit(str(exc)) from None
    if expected and found.name != expected:
        raise SystemExit(
            f"{checkpoint} is a {found.model} checkpoint (generation {found.name}), but this image is built for "
            f"generation {expected}: build it with GENERATION={found.name}, or bake a {expected} checkpoint"
        )
    try:
        installed = importlib_metadata.version("anemoi-models")
    except importlib_metadata.PackageNotFoundError:
        installed = "not installed"
    if not found.loads(installed):
        line = ".".join(map(str, found.anemoi_models))
        raise SystemExit(
            f"{checkpoint} needs anemoi-models {line}.x (generation {found.name}); this image has anemoi-models "
            f"{installed}, which cannot load it"
        )
    return {"generation": f"{found.name} ({found.model}; anemoi-models {installed})"}


def bake(repo: str, filename: str, revision: str, link: Path, sha256: str | None,
         generation: str | None = None, generations_module: Path | None = None) -> dict[str, str]:
    from huggingface_hub import hf_hub_download

    cached = Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    commit = point_main_at_snapshot(cached)
    real = cached.resolve()

    if sha256:
        actual = sha256_of(real)
        if actual.lower() != sha256.lower():
            raise SystemExit(f"checkpoint {repo}/{filename}@{revision}: SHA-256 {actual}, expected {sha256}")

    from anemoi.utils.checkpoints import load_metadata

    try:
        metadata = load_metadata(str(real))
    except Exception as exc:  # not a zip, no anemoi metadata: an error page or a wrong file
        raise SystemExit(f"{repo}/{filename} is not an anemoi checkpoint: {type(exc).__name__}: {exc}") from None
    found = check_generation(metadata, f"{repo}/{filename}", generation, load_generations(generations_module))

    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(real)
    return {
        "repo": repo,
        "filename": filename,
        "commit": commit,
        "path": str(link),
        "bytes": str(real.stat().st_size),
        "metadata_keys": ",".join(sorted(metadata)[:8]),
        **found,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True)
    p.add_argument("--filename", required=True)
    p.add_argument("--revision", default="main")
    p.add_argument("--link", required=True, type=Path, help="stable path to give the checkpoint")
    p.add_argument("--sha256", default=os.environ.get("AIFS_CHECKPOINT_SHA256") or None)
    p.add_argument("--generation", default=None, help="the image's generation (v1, v2): the checkpoint must be one")
    p.add_argument("--generations-module", type=Path, default=None,
                   help="path of aifs/generations.py when the aifs package is not installed")
    args = p.parse_args(argv)
    facts = bake(args.repo, args.filename, args.revision, args.link, args.sha256, args.generation, args.generations_module)
    for key, value in facts.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
