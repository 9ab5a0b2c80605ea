"""The worker hands each step's arrays to the GRIB writer thread without copying them.

That is only safe while anemoi-inference allocates new arrays every step (it reuses the state
dict, which the worker does copy). This test pins that behaviour on the real runner: if a future
anemoi-inference starts writing steps into the same buffers, it fails here, not in the forecasts.
"""

from __future__ import annotations

import numpy as np

from aifs.layout import parse_date
from aifs.testing.synthetic import make_input_state
from aifs.worker.model import Model
from aifs.worker.validate import check_input_state
from aifs.worker.windows import copy_state


def test_step_arrays_are_not_reused_between_steps(checkpoint):
    model = Model(checkpoint, device="cpu", precision=None, num_chunks=None)
    date = parse_date("20250601_0000")
    state = check_input_state(make_input_state(checkpoint, date), model.spec, date, 1, "synthetic")

    kept, frozen = [], []
    for step_state in model.forecast(state, lead_time_hours=36, seed=7):
        copied = copy_state(step_state)
        kept.append(copied)
        frozen.append({name: values.copy() for name, values in copied["fields"].items()})

    assert len(kept) == 6
    assert len({id(k["fields"]) for k in kept}) == len(kept), "the worker's copies must not share a fields dict"
    for copied, snapshot in zip(kept, frozen):
        # what the writer thread would read later is still exactly what the step produced
        for name, values in snapshot.items():
            assert np.array_equal(copied["fields"][name], values, equal_nan=True), name
    first, last = kept[0]["fields"], kept[-1]["fields"]
    assert not any(np.shares_memory(first[name], last[name]) for name in first)
