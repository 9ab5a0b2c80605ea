"""A tiny AIFS-ENS stand-in checkpoint that anemoi-inference loads through its normal path.

The checkpoint is what anemoi-training produces for inference: a pickled ``torch.nn.Module``
(``torch.save``) with anemoi metadata and supporting arrays (latitudes, longitudes) written
into the zip by ``anemoi.utils.checkpoints.save_metadata``. The module's ``predict_step``
persists the last input state and adds noise from torch's global RNG, so the runner's seed
makes members differ exactly as it does for the real model.

The class must stay importable as ``aifs.testing.tiny_model.TinyEnsModel``: unpickling the
checkpoint imports it.
"""

from __future__ import annotations

import base64
import functools
import os
import time
import zlib

import numpy as np
import torch

#: Default variable sets: what the tests use on O48.
PROGNOSTIC = ["10u", "10v", "2t", "msl", "t_850", "z_500"]
CONSTANT = ["lsm", "z"]
DIAGNOSTIC = ["tp"]
COMPUTED = {  # computed forcing -> constant_in_time
    "cos_latitude": True,
    "sin_latitude": True,
    "cos_longitude": True,
    "sin_longitude": True,
    "cos_julian_day": False,
    "sin_julian_day": False,
    "cos_local_time": False,
    "sin_local_time": False,
    "insolation": False,
}
ACCUMULATED = {"tp", "cp", "sf", "ro", "ssrd", "strd"}  # GRIB accumulations (stepType accum)

#: ~100 output fields: what a real AIFS-ENS step writes (benchmark on N320).
PRESSURE_LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
PL_PARAMS = ["q", "t", "u", "v", "w", "z"]
SURFACE = ["10u", "10v", "2d", "2t", "msl", "skt", "sp", "tcw", "stl1", "stl2", "swvl1", "swvl2"]
BENCH_PROGNOSTIC = SURFACE + [f"{p}_{lev}" for p in PL_PARAMS for lev in PRESSURE_LEVELS]
BENCH_CONSTANT = ["lsm", "z", "slor", "sdor"]
BENCH_DIAGNOSTIC = ["tp", "cp", "tcc", "100u", "100v", "hcc", "lcc", "mcc", "ro", "sf", "ssrd", "strd"]


class TinyEnsModel(torch.nn.Module):
    """``predict_step(x[1, time, grid, n_in]) -> y[1, 1, 1, grid, n_out]``.

    Prognostic outputs persist the last input plus ``noise`` x N(0, 1) from torch's RNG;
    diagnostics are small positive noise. ``step_seconds`` makes each step take at least that
    long (a stand-in for GPU time in benchmarks; 0 in tests).
    """

    def __init__(self, prog_in, prog_out, diag_out, n_out, noise=0.1, step_seconds=0.0):
        super().__init__()
        self.register_buffer("prog_in", torch.tensor(prog_in, dtype=torch.long))
        self.register_buffer("prog_out", torch.tensor(prog_out, dtype=torch.long))
        self.register_buffer("diag_out", torch.tensor(diag_out, dtype=torch.long))
        self.n_out, self.noise, self.step_seconds = n_out, noise, step_seconds
        self.scale = torch.nn.Parameter(torch.ones(()))

    def predict_step(self, x, **kwargs):  # the runner passes fcstep=, step=, date=, ...
        started = time.perf_counter()
        last = x[0, -1]
        y = torch.zeros(1, 1, 1, last.shape[0], self.n_out, dtype=x.dtype, device=x.device)
        prog = last[:, _columns(self.prog_in)] * self.scale
        noise = torch.randn_like(prog).mul_(self.noise)  # in place: same values, no extra N320-sized temporaries
        y[0, 0, 0][:, _columns(self.prog_out)] = noise.add_(prog)
        y[0, 0, 0][:, self.diag_out] = 1e-3 * torch.rand(
            last.shape[0], len(self.diag_out), dtype=x.dtype, device=x.device
        )
        if self.step_seconds:
            time.sleep(max(0.0, self.step_seconds - (time.perf_counter() - started)))
        return y


def _columns(index: torch.Tensor):
    """A slice when ``index`` is one ascending run (the usual layout), else the index itself.

    Same result either way, but on N320 x ~100 fields a gather/scatter by index tensor costs
    seconds of CPU a step, more than the ``step_seconds`` it is meant to stay under.
    """
    n = len(index)
    if n and int(index[-1]) - int(index[0]) == n - 1 and bool((index.diff() == 1).all()):
        return slice(int(index[0]), int(index[0]) + n)
    return index


def mars_request(name: str) -> dict:
    """``t_850`` -> ``{param: t, levtype: pl, levelist: 850}``; ``2t`` -> surface."""
    param, _, level = name.rpartition("_")
    if param and level.isdigit():
        return {"param": param, "levtype": "pl", "levelist": int(level)}
    return {"param": name, "levtype": "sfc"}


@functools.lru_cache(maxsize=None)
def builtin_grid_latlon(grid: str) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes of one of anemoi-inference's builtin GRIB template grids."""
    import anemoi.inference.grib.templates.builtin as builtin
    import earthkit.data as ekd
    import yaml

    with open(os.path.join(os.path.dirname(builtin.__file__), "builtin.yaml")) as f:
        index = yaml.safe_load(f)
    matches = [blob for match, blob in index if match == {"grid": grid}]
    if not matches:
        raise ValueError(f"no builtin GRIB template for grid {grid!r}")
    field = ekd.from_source("memory", zlib.decompress(base64.b64decode(matches[0])))[0]
    latlon = field.to_latlon(flatten=True)
    return np.asarray(latlon["lat"], "f8"), np.asarray(latlon["lon"], "f8")


def anemoi_metadata(
    grid: str,
    prognostic: list[str],
    constant: list[str],
    diagnostic: list[str],
    variables_metadata: dict[str, dict] | None = None,
) -> tuple[dict, dict[str, int], dict[str, int]]:
    """The anemoi metadata of a checkpoint with these variables, as anemoi-training writes it.

    Returns ``(metadata, model_input_index, model_output_index)``. The data order is prognostic,
    constant forcings, computed forcings, diagnostics. ``variables_metadata`` overrides or adds
    per-variable entries (e.g. a variable's GRIB ``mars`` request). Shared by the v1 stand-in
    below and tiny_model_v2 (the real v2 architecture).
    """
    from anemoi.utils.provenance import gather_provenance_info

    import anemoi.models  # noqa: F401 - provenance records the modules imported: this environment's anemoi-models

    latitudes, _ = builtin_grid_latlon(grid)
    variables = list(prognostic) + list(constant) + list(COMPUTED) + list(diagnostic)
    index = {v: i for i, v in enumerate(variables)}
    data_in = [index[v] for v in variables if v not in diagnostic]
    data_out = [index[v] for v in variables if v in prognostic or v in diagnostic]
    model_in = {variables[i]: j for j, i in enumerate(data_in)}
    model_out = {variables[i]: j for j, i in enumerate(data_out)}
    forcing = list(constant) + list(COMPUTED)

    meta = {v: {"mars": mars_request(v)} for v in prognostic}
    meta |= {v: {"mars": mars_request(v), "constant_in_time": True} for v in constant}
    meta |= {v: {"computed_forcing": True, "constant_in_time": c} for v, c in COMPUTED.items()}
    for v in diagnostic:
        meta[v] = {"mars": mars_request(v)}
        if v in ACCUMULATED:
            meta[v] |= {"process": "accumulation", "period": [0, 6]}
    for v, extra in (variables_metadata or {}).items():
        meta[v] = {**meta.get(v, {}), **extra}

    metadata = {
        "config": {
            "training": {"multistep_input": 2, "precision": "32"},
            "data": {"timestep": "6h", "forcing": forcing, "diagnostic": list(diagnostic)},
        },
        "data_indices": {
            "data": {
                "input": {
                    "full": data_in,
                    "forcing": [index[v] for v in forcing],
                    "diagnostic": [index[v] for v in diagnostic],
                },
                "output": {"full": data_out},
            },
            "model": {
                "input": {
                    "full": list(range(len(data_in))),
                    "forcing": [model_in[v] for v in forcing],
                    "prognostic": [model_in[v] for v in prognostic],
                },
                "output": {
                    "full": list(range(len(data_out))),
                    "prognostic": [model_out[v] for v in prognostic],
                },
            },
        },
        "dataset": {
            "variables": variables,
            "shape": [1, len(variables), 1, len(latitudes)],
            "variables_metadata": meta,
            "data_request": {"grid": grid},
        },
        # what anemoi-training records: the versions the checkpoint was made with (here: this
        # environment's); aifs.generations chooses the worker environment from it
        "provenance_training": gather_provenance_info(),
    }
    return metadata, model_in, model_out


def save_checkpoint(path: str, model, metadata: dict, grid: str) -> str:
    """``torch.save`` the module, then add anemoi's metadata and the grid as supporting arrays."""
    from anemoi.utils.checkpoints import save_metadata

    latitudes, longitudes = builtin_grid_latlon(grid)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model, path)
    save_metadata(path, metadata, supporting_arrays={"latitudes": latitudes, "longitudes": longitudes})
    return path


def build_checkpoint(
    path: str,
    grid: str = "O48",
    prognostic: list[str] = PROGNOSTIC,
    constant: list[str] = CONSTANT,
    diagnostic: list[str] = DIAGNOSTIC,
    noise: float = 0.1,
    step_seconds: float = 0.0,
) -> str:
    """Write a tiny checkpoint for ``grid`` (a builtin template grid: O48, O96, N128, N320)."""
    metadata, model_in, model_out = anemoi_metadata(grid, prognostic, constant, diagnostic)
    model = TinyEnsModel(
        [model_in[v] for v in prognostic],
        [model_out[v] for v in prognostic],
        [model_out[v] for v in diagnostic],
        len(model_out),
        noise=noise,
        step_seconds=step_seconds,
    )
    return save_checkpoint(path, model, metadata, grid)
