"""The model: an anemoi-inference runner loaded once per process, reseeded for every member.

Everything the worker needs to know about the model (input variables, grid, time levels,
time step, output fields) is read from the checkpoint's metadata, so a checkpoint the worker
has never seen works the same way as the one it was tested with.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
from importlib import metadata as importlib_metadata
from typing import Any, Iterator

from aifs.layout import DEFAULT_CHECKPOINT
from aifs.worker.errors import CheckpointFailed

LOG = logging.getLogger("aifs.worker")

#: Hugging Face repositories we know, with the checkpoint file to take from each
#: (a snapshot of the whole repository would fetch far more than the model).
KNOWN_HF_CHECKPOINTS = {"ecmwf/aifs-ens-1.0": "aifs-ens-crps-1.0.ckpt"}
#: Bytes a GRIB value takes (16-bit packing) plus headroom for headers/bitmaps, for disk estimates.
GRIB_BYTES_PER_VALUE = 2.2


def resolve_checkpoint(text: str) -> str | dict[str, Any]:
    """A local path, or the anemoi-inference Hugging Face source for ``org/repo[:filename]``."""
    if os.path.exists(text):
        return text
    repo, _, filename = text.partition(":")
    if repo.count("/") == 1 and not text.startswith((".", "/", "~")) and not repo.endswith(".ckpt"):
        filename = filename or KNOWN_HF_CHECKPOINTS.get(repo, "")
        return {"huggingface": {"repo_id": repo, **({"filename": filename} if filename else {})}}
    raise CheckpointFailed(f"checkpoint not found: {text} (give a file path or a Hugging Face id like {DEFAULT_CHECKPOINT})")


def member_seed(date: str, member: int) -> int:
    """Seed of one member of one date: stable across processes, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(f"aifs-ens:{date}:{member}".encode()).digest()[:4], "big")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What an input state must look like and what one step writes, from the checkpoint."""

    input_variables: tuple[str, ...]  # must be in the input state (computed forcings excluded)
    output_variables: tuple[str, ...]
    grid_points: int
    time_levels: int
    timestep: dt.timedelta

    def window_bytes(self, window_hours: int) -> int:
        steps = max(1, int(dt.timedelta(hours=window_hours) / self.timestep))
        return int(len(self.output_variables) * self.grid_points * GRIB_BYTES_PER_VALUE * steps)


class Model:
    """One runner, one model load, many members."""

    def __init__(self, checkpoint: str, device: str | None, precision: str | None, num_chunks: int | None):
        if num_chunks:
            # read by anemoi-models at import time: must be set before the checkpoint is unpickled
            os.environ["ANEMOI_INFERENCE_NUM_CHUNKS"] = str(num_chunks)
        self.checkpoint_name = checkpoint
        source = resolve_checkpoint(checkpoint)
        try:
            import torch
            from anemoi.inference.runners.simple import SimpleRunner

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.runner = SimpleRunner(source, device=device, precision=precision)
            (self.metadata,) = self.runner.checkpoint.multi_dataset_metadata.values()
            self.spec = self._spec()
            LOG.info(
                "[MODEL] %s on %s: %d input variables, %d output fields a step, %d grid points, step %s",
                checkpoint, device, len(self.spec.input_variables), len(self.spec.output_variables),
                self.spec.grid_points, self.spec.timestep,
            )
            _ = self.runner.model  # load the weights now: a bad checkpoint fails before any member starts
        except CheckpointFailed:
            raise
        except Exception as exc:  # torch/anemoi raise many kinds; all mean the same to the DAG
            raise CheckpointFailed(f"could not load checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc

    def _spec(self) -> ModelSpec:
        md = self.metadata
        computed = set(md.model_computed_variables)
        return ModelSpec(
            input_variables=tuple(v for v in md.variable_to_input_tensor_index if v not in computed),
            output_variables=tuple(md.output_tensor_index_to_variable.values()),
            grid_points=int(md.number_of_grid_points),
            time_levels=int(md.multi_step_input),
            timestep=md.timestep,
        )

    def forecast(self, state: dict, lead_time_hours: int, seed: int) -> Iterator[dict]:
        """Yield one state per step. The runner reuses one dict between steps: copy what you keep."""
        import torch

        torch.manual_seed(seed)  # seeds every device; the ensemble noise comes from torch's RNG
        self.runner.reference_date = state["date"]  # the runner keeps the first run's date otherwise
        yield from self.runner.run(input_states=state, lead_time=lead_time_hours)

    def accumulator(self):
        """A fresh accumulate-from-start post-processor (one per member, applied before windowing)."""
        from anemoi.inference.post_processors.accumulate import Accumulate

        return Accumulate(self.runner, self.metadata)


def software_versions() -> dict[str, str]:
    versions = {}
    for dist in ("aifs-ens-airflow", "anemoi-inference", "anemoi-models", "torch", "eccodes", "earthkit-data", "numpy"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions
