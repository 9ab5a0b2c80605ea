"""The model: an anemoi-inference runner loaded once per process, reseeded for every member.

Everything the worker needs to know about the model (input variables, grid, time levels,
time step, output fields) is read from the checkpoint's metadata, so a checkpoint the worker
has never seen works the same way as the one it was tested with.

The metadata is read first, without torch and without the weights (anemoi keeps it in a small
JSON entry of the checkpoint zip): it sizes the input budget and validates inputs. The weights
load once per process, when the first input that passed validation needs them, so a bad input
never costs a model load or GPU memory.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import time
from importlib import metadata as importlib_metadata
from typing import Any, Iterator

from aifs.layout import DEFAULT_CHECKPOINT
from aifs.worker.errors import CheckpointFailed
from aifs.worker.safe_pickle import InputBudget

LOG = logging.getLogger("aifs.worker")

#: Hugging Face repositories we know, with the checkpoint file to take from each
#: (a snapshot of the whole repository would fetch far more than the model).
KNOWN_HF_CHECKPOINTS = {"ecmwf/aifs-ens-1.0": "aifs-ens-crps-1.0.ckpt", "ecmwf/aifs-ens-2.0": "aifs-ens-crps-2.0.ckpt"}
#: Bytes a GRIB value takes (16-bit packing) plus headroom for headers/bitmaps, for disk estimates.
GRIB_BYTES_PER_VALUE = 2.2
#: An input state may claim this many times its float64 size (variables x time levels x grid points
#: x 8 bytes), plus INPUT_SLACK_BYTES: room for extra fields (coordinates, variables the model does
#: not read) and for protocol-2 pickles, which hold each array as text and as bytes while loading.
INPUT_MARGIN = 3
INPUT_SLACK_BYTES = 64 << 20


def resolve_checkpoint(text: str, client=None) -> str | dict[str, Any]:
    """A local path, or the anemoi-inference Hugging Face source for ``org/repo[:filename]``.

    ``gs://bucket/object``: the local copy in this host's checkpoint cache, downloaded (verified) with
    ``client`` when not there yet (aifs.worker.checkpoint_cache).
    """
    from aifs.worker.checkpoint_cache import is_gs_reference, local_copy

    if is_gs_reference(text):
        return local_copy(text, client)
    if os.path.exists(text):
        return text
    repo, _, filename = text.partition(":")
    if repo.count("/") == 1 and not text.startswith((".", "/", "~")) and not repo.endswith(".ckpt"):
        filename = filename or KNOWN_HF_CHECKPOINTS.get(repo, "")
        return {"huggingface": {"repo_id": repo, **({"filename": filename} if filename else {})}}
    raise CheckpointFailed(f"checkpoint not found: {text} (give a file path, gs://<bucket>/<object> or a Hugging Face id "
                           f"like {DEFAULT_CHECKPOINT})")


def member_seed(date: str, member: int) -> int:
    """Seed of one member of one date: stable across processes, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(f"aifs-ens:{date}:{member}".encode()).digest()[:4], "big")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What an input state must look like and what one step writes, from the checkpoint."""

    input_variables: tuple[str, ...]  # the model reads them (computed forcings excluded)
    output_variables: tuple[str, ...]  # GRIB fields written a step (after the checkpoint's output transforms)
    grid_points: int
    time_levels: int
    timestep: dt.timedelta
    #: input variables the checkpoint's processors impute: NaN allowed there, nowhere else (field_rules)
    nan_allowed: frozenset[str] = frozenset()
    #: model input variable -> the variable an input pickle may carry instead (e.g. cos_mwd <- mwd in degrees)
    input_sources: dict[str, str] = dataclasses.field(default_factory=dict)
    #: forward transforms (field_rules.DirectionTransform) that make the model's variables from the pickle's
    input_transforms: tuple = ()

    def input_budget(self) -> InputBudget:
        """The most memory an input state for this checkpoint may claim while it is unpickled."""
        values = len(self.input_variables) * self.time_levels * self.grid_points
        return InputBudget(
            values * 8 * INPUT_MARGIN + INPUT_SLACK_BYTES,
            f"{len(self.input_variables)} variables x {self.time_levels} time levels x {self.grid_points} grid points "
            f"x 8 bytes, x{INPUT_MARGIN} + {INPUT_SLACK_BYTES >> 20} MiB, from the checkpoint's metadata",
        )

    def window_bytes(self, window_hours: int) -> int:
        steps = max(1, int(dt.timedelta(hours=window_hours) / self.timestep))
        return int(len(self.output_variables) * self.grid_points * GRIB_BYTES_PER_VALUE * steps)


class Model:
    """One checkpoint: its metadata at once, its weights on first use; one model load, many members."""

    def __init__(self, checkpoint: str, device: str | None, precision: str | None, num_chunks: int | None,
                 *, weights: bool = True, client=None):
        """``weights=False``: only the metadata will be used (the inputs step, GRIB writer processes), so a
        checkpoint of another generation than this environment's is fine; otherwise it is refused here.
        ``client``: the storage client a ``gs://`` checkpoint is fetched with (the worker's own, as for its
        inputs and outputs); unused for a path or a Hugging Face id."""
        if num_chunks:
            # read by anemoi-models at import time: must be set before the checkpoint is unpickled
            os.environ["ANEMOI_INFERENCE_NUM_CHUNKS"] = str(num_chunks)
        self.checkpoint_name = checkpoint
        self._device, self._precision = device, precision
        self._runner = None
        source = resolve_checkpoint(checkpoint, client)  # gs://: a local file now; the runner and GRIB writers load it
        try:
            from anemoi.inference.checkpoint import Checkpoint

            # anemoi.utils.checkpoints.load_metadata under the hood: the metadata entry of the zip, no torch
            self._checkpoint = Checkpoint(source)
            (self.metadata,) = self._checkpoint.multi_dataset_metadata.values()
            self.raw_metadata = _raw_metadata(self.metadata)
            if weights:
                check_generation(self.raw_metadata, checkpoint)
            self._weights_allowed = weights
            self.spec = self._spec()
        except CheckpointFailed:
            raise
        except Exception as exc:  # a missing file, a zip without anemoi metadata, a download that failed
            raise CheckpointFailed(f"could not read the metadata of checkpoint {checkpoint}: {type(exc).__name__}: {exc}") from exc
        LOG.info(
            "[MODEL] %s: %d input variables, %d output fields a step, %d grid points, step %s "
            "(metadata; the weights load for the first valid input)",
            checkpoint, len(self.spec.input_variables), len(self.spec.output_variables), self.spec.grid_points,
            self.spec.timestep,
        )

    @property
    def weights_loaded(self) -> bool:
        return self._runner is not None

    def load_weights(self) -> None:
        """Build the runner and load the weights, once; CheckpointFailed if they cannot be loaded."""
        if self._runner is not None:
            return
        if not self._weights_allowed:
            raise CheckpointFailed(f"{self.checkpoint_name} was opened for its metadata only (weights=False)")
        started = time.perf_counter()
        try:
            import torch
            from anemoi.inference.runners.simple import SimpleRunner

            device = self._device or ("cuda" if torch.cuda.is_available() else "cpu")
            runner = SimpleRunner(self._checkpoint.path, device=device, precision=self._precision,
                                  **self.plan.runner_options(self.raw_metadata_variables))
            _ = runner.model  # load the weights now: a bad checkpoint fails before this member's forecast starts
            (metadata,) = runner.checkpoint.multi_dataset_metadata.values()
        except Exception as exc:  # torch/anemoi raise many kinds; all mean the same to the DAG
            raise CheckpointFailed(f"could not load checkpoint {self.checkpoint_name}: {type(exc).__name__}: {exc}") from exc
        self._runner, self.metadata = runner, metadata  # the runner's own metadata object, for its outputs
        LOG.info("[MODEL] weights of %s loaded on %s in %.1f s", self.checkpoint_name, device, time.perf_counter() - started)

    @property
    def runner(self):
        self.load_weights()
        return self._runner

    @property
    def raw_metadata_variables(self) -> dict:
        return dict((self.raw_metadata.get("dataset") or {}).get("variables_metadata") or {})

    def _spec(self) -> ModelSpec:
        from aifs.worker.field_rules import plan_fields

        md = self.metadata
        computed = set(md.model_computed_variables)
        inputs = tuple(v for v in md.variable_to_input_tensor_index if v not in computed)
        self.plan = plan_fields(self.raw_metadata, inputs, md.output_tensor_index_to_variable.values())
        return ModelSpec(
            input_variables=inputs,
            output_variables=self.plan.written_variables,
            grid_points=int(md.number_of_grid_points),
            time_levels=int(md.multi_step_input),
            timestep=md.timestep,
            nan_allowed=self.plan.nan_allowed,
            input_sources=dict(self.plan.input_sources),
            input_transforms=self.plan.input_transforms,
        )

    def grib_output_options(self) -> dict:
        """The checkpoint's GRIB output options (post-processors, per-parameter GRIB2 keys): field_rules."""
        return self.plan.grib_output_options()

    def forecast(self, state: dict, lead_time_hours: int, seed: int) -> Iterator[dict]:
        """Yield one state per step. The runner reuses one dict between steps: copy what you keep."""
        import torch

        runner = self.runner  # loads the weights if nobody has yet
        torch.manual_seed(seed)  # seeds every device; the ensemble noise comes from torch's RNG
        runner.reference_date = state["date"]  # the runner keeps the first run's date otherwise
        yield from runner.run(input_states=state, lead_time=lead_time_hours)

    def accumulator(self):
        """A fresh accumulate-from-start post-processor (one per member, applied before windowing)."""
        from anemoi.inference.post_processors.accumulate import Accumulate

        return Accumulate(self.runner, self.metadata)


def _raw_metadata(metadata) -> dict:
    """The checkpoint's anemoi metadata as a plain dict (anemoi-inference keeps it as ``_metadata``)."""
    raw = getattr(metadata, "_metadata", None)
    if raw is None:
        return {}
    try:
        return raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    except Exception:  # a DotDict that cannot convert: its mapping interface is enough
        return raw


def environment_generation():
    """The generation (aifs.generations) whose checkpoints this environment's anemoi-models unpickles."""
    from aifs.generations import GENERATIONS

    version = importlib_metadata.version("anemoi-models")
    for generation in GENERATIONS.values():
        if generation.loads(version):
            return generation, version
    return None, version


def check_generation(raw_metadata: dict, checkpoint: str) -> None:
    """CheckpointFailed unless this environment's anemoi-models loads the checkpoint's generation.

    A checkpoint is a pickled anemoi-models module: another release line cannot unpickle it (or
    worse, unpickles it into a model that computes something else). Decided from what the
    checkpoint records (aifs.generations.generation_of), before any weights or member.
    """
    from aifs.generations import UnsupportedCheckpoint, generation_of

    try:
        needed = generation_of(raw_metadata, checkpoint)
    except UnsupportedCheckpoint as exc:
        raise CheckpointFailed(str(exc)) from exc
    here, version = environment_generation()
    if here is None or here.name != needed.name:
        made_with = next((v for k, v in sorted(_recorded(raw_metadata).items()) if k in ("anemoi.models", "anemoi-models")), "?")
        raise CheckpointFailed(
            f"checkpoint {checkpoint} is {needed.model} (generation {needed.name}, made with anemoi-models {made_with}): "
            f"it needs the {needed.name} worker environment ({needed.requirements}, locally {needed.local_venv}), "
            f"but this one has anemoi-models {version}"
            + (f" (generation {here.name}, {here.model})" if here else "")
        )


def _recorded(raw_metadata: dict) -> dict[str, str]:
    from aifs.generations import recorded_versions

    return recorded_versions(raw_metadata)


def software_versions() -> dict[str, str]:
    from aifs.manifest import installed_versions

    return installed_versions(("aifs-ens-airflow", "anemoi-inference", "anemoi-models", "torch", "eccodes", "earthkit-data", "numpy"))
