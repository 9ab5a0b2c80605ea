"""Checkpoint generations: which worker environment can load which AIFS-ENS checkpoint.

A checkpoint is a pickled anemoi-models module, so only the anemoi-models release line it was
trained with can unpickle it: AIFS-ENS 1.0 needs anemoi-models 0.6.x, AIFS-ENS 2.0 needs 0.11.x,
and neither environment loads the other's checkpoint. The checkpoint records the versions it was
made with (``provenance_training.module_versions`` in its anemoi metadata, what
``anemoi-inference inspect --requirements`` prints); the generation is chosen from that record,
never from the checkpoint's name.

One source of truth for the DAG (pick the image or local environment, refuse a checkpoint no
environment loads before any host exists) and the worker (refuse to run in the wrong one).
Light: no torch, no anemoi imports.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping


class UnsupportedCheckpoint(ValueError):
    """No worker environment of this package can load the checkpoint; the message says what it needs."""


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # "v1", "v2": the key in settings (images, local environments)
    model: str  # what ECMWF calls the model
    anemoi_models: tuple[int, int]  # the anemoi-models release line (major, minor) that unpickles it
    requirements: str  # the pinned worker requirements file of this generation
    local_venv: str  # the local worker environment `make env` builds for it
    default_checkpoint: str  # its Hugging Face checkpoint

    def loads(self, anemoi_models_version: str) -> bool:
        return _release_line(anemoi_models_version) == self.anemoi_models


#: Every generation this package can run, oldest first. Adding one is adding a row here, a
#: requirements file and a worker image: nothing else branches on the generation.
GENERATIONS: dict[str, Generation] = {
    g.name: g
    for g in (
        Generation("v1", "AIFS-ENS 1.0", (0, 6), "requirements-worker.txt", ".venv", "ecmwf/aifs-ens-1.0"),
        Generation("v2", "AIFS-ENS 2.0", (0, 11), "requirements-worker-v2.txt", ".venv-v2", "ecmwf/aifs-ens-2.0"),
    )
}

#: The generation new deployments run: the one ECMWF runs operationally (v2 since 12 May 2026).
DEFAULT_GENERATION = "v2"


def _release_line(version: str) -> tuple[int, int] | None:
    match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def recorded_versions(metadata: Mapping[str, Any]) -> dict[str, str]:
    """``{module: version}`` the checkpoint was trained with (values are strings or ``{"version": ...}``)."""
    modules = (metadata.get("provenance_training") or {}).get("module_versions") or {}
    versions = {}
    for module, value in modules.items():
        if isinstance(value, Mapping):
            value = value.get("version")
        if isinstance(value, str) and value[:1].isdigit():
            versions[module] = value
    return versions


def generation_of(metadata: Mapping[str, Any], checkpoint: str = "the checkpoint") -> Generation:
    """The generation whose environment loads a checkpoint with this anemoi metadata."""
    versions = recorded_versions(metadata)
    made_with = versions.get("anemoi.models") or versions.get("anemoi-models")
    known = ", ".join(f"{g.name} (anemoi-models {g.anemoi_models[0]}.{g.anemoi_models[1]}.x)" for g in GENERATIONS.values())
    if not made_with:
        raise UnsupportedCheckpoint(
            f"{checkpoint} does not record the anemoi-models version it was trained with "
            f"(provenance_training.module_versions in its metadata), so no worker environment can be chosen for it; "
            f"environments: {known}"
        )
    for generation in GENERATIONS.values():
        if generation.loads(made_with):
            return generation
    extra = {k: v for k, v in versions.items() if k in ("torch", "torch_geometric", "anemoi.graphs", "flash_attn")}
    raise UnsupportedCheckpoint(
        f"{checkpoint} was trained with anemoi-models {made_with}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(extra.items()))})" if extra else "")
        + f": no worker environment of this deployment loads it; environments: {known}"
    )
