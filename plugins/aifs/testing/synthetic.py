"""Synthetic input states for any checkpoint: what the worker expects to find in the bucket.

Everything comes from the checkpoint's metadata (variables, grid size, time levels), so the
generator works for the tiny test model and for a real AIFS checkpoint alike. Values are
plausible magnitudes per parameter plus noise; they are meant to exercise the pipeline, not
to make a meaningful forecast.
"""

from __future__ import annotations

import datetime as dt
import pickle
import zlib

import numpy as np

#: Typical magnitudes per GRIB short name (surface or pressure-level parameter).
TYPICAL = {
    "2t": 288.0, "2d": 283.0, "skt": 288.0, "sst": 290.0, "stl1": 285.0, "stl2": 285.0,
    "msl": 101325.0, "sp": 98000.0, "t": 250.0, "z": 50000.0, "q": 0.005, "tcw": 20.0,
    "lsm": 0.3, "slor": 0.01, "sdor": 50.0, "swvl1": 0.3, "swvl2": 0.3,
}


def required_input_variables(checkpoint_path: str) -> tuple[list[str], int, int]:
    """(variables the input state must carry, number of grid points, time levels)."""
    from anemoi.inference.checkpoint import Checkpoint

    (metadata,) = Checkpoint(checkpoint_path).multi_dataset_metadata.values()
    computed = set(metadata.model_computed_variables)
    variables = [v for v in metadata.variable_to_input_tensor_index if v not in computed]
    return variables, metadata.number_of_grid_points, metadata.multi_step_input


def make_input_state(checkpoint_path: str, date: dt.datetime, seed: int = 0) -> dict:
    """``{"date": date, "fields": {name: float32 (time levels, grid points)}}``."""
    variables, points, levels = required_input_variables(checkpoint_path)
    rng = np.random.default_rng(seed)
    fields = {}
    for name in variables:
        param = name.split("_")[0]
        base = TYPICAL.get(name, TYPICAL.get(param, 0.0))
        # a smooth large-scale pattern plus a little noise, scaled to the parameter
        pattern = np.sin(np.linspace(0.0, 20.0, points)) * (abs(base) * 0.02 + 1.0)
        noise = rng.standard_normal((levels, points)) * (abs(base) * 0.001 + 0.1)
        fields[name] = (base + pattern + noise).astype("float32")
    return {"date": date, "fields": fields}


def synthetic_input_seed(date: dt.datetime, member: int) -> int:
    """Seed of a member's synthetic input values (not the forecast seed: aifs.worker.model.member_seed)."""
    return zlib.crc32(f"{date.isoformat()}:{member}".encode())


def write_input_state(path: str, state: dict) -> str:
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def seed_bucket(bucket, date_text: str, members: list[int], checkpoint_path: str, workdir: str) -> list[str]:
    """Upload one synthetic input pickle per member to ``bucket`` (a google-cloud-storage Bucket)."""
    import os

    from aifs.layout import input_filename, input_object, parse_date

    date = parse_date(date_text)
    names = []
    for member in members:
        local = os.path.join(workdir, input_filename(member))
        write_input_state(local, make_input_state(checkpoint_path, date, seed=synthetic_input_seed(date, member)))
        blob = bucket.blob(input_object(date_text, member))
        blob.upload_from_filename(local, checksum="crc32c")
        os.remove(local)
        names.append(blob.name)
    return names
