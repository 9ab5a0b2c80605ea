"""Inputs that must be refused before any model time: exit 10/11, nothing uploaded, nothing left on disk."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re

import numpy as np
import pytest
from worker_helpers import (
    DATE,
    forecast_names,
    make_state,
    manifest_names,
    tagged,
    upload_bytes,
    upload_state,
    worker_args,
)

from aifs import layout

MEMBER = 3
LEAD = 12  # two steps, one window: enough to prove nothing is written, fast

pytestmark = pytest.mark.timeout(120)


class _Reduce:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _pickle(state) -> bytes:
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def _assert_refused(code, text, expected_code, client, bucket, dirs, *fragments):
    """Exit code; one message naming member, file and problem; nothing in the bucket or on disk."""
    assert code == expected_code, text[-5000:]
    member = re.compile(rf"member\s*0*{MEMBER}\b", re.I)
    messages = [line for line in text.splitlines()
                if member.search(line) and layout.input_filename(MEMBER) in line
                and all(re.search(f, line, re.I) for f in fragments)]
    assert messages, f"no line names member {MEMBER}, the file and {fragments}:\n" + text[-4000:]
    assert forecast_names(client, bucket.name) == []
    assert manifest_names(client, bucket.name) == []
    assert dirs.files() == []
    assert "[CLEANUP]" in text
    # an invalid input never costs a model load: the metadata sized and checked it, the weights stayed on disk
    assert not _weights_loaded(text), _weights_loaded(text)
    rerun = tagged(text, "[RERUN]")
    assert rerun and f"--members {MEMBER}" in rerun[-1]


def _weights_loaded(text: str) -> list[str]:
    return [line for line in tagged(text, "[MODEL]") if re.search(r"weights of .* loaded", line)]


def _run(run_main, bucket, checkpoint, dirs):
    return run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members=str(MEMBER), lead_time=LEAD))


def test_missing_pickle_exit_10(run_main, client, bucket, checkpoint, dirs):
    code, text = _run(run_main, bucket, checkpoint, dirs)
    _assert_refused(code, text, 10, client, bucket, dirs, re.escape(layout.input_object(DATE, MEMBER)))


def test_truncated_pickle(run_main, client, bucket, checkpoint, dirs):
    data = _pickle(make_state(checkpoint, DATE, MEMBER))
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), data[: len(data) // 2])
    code, text = _run(run_main, bucket, checkpoint, dirs)
    _assert_refused(code, text, 11, client, bucket, dirs)


def test_hostile_pickle_never_runs(run_main, client, bucket, checkpoint, dirs, tmp_path):
    target = tmp_path / "pwned-by-pickle"
    state = make_state(checkpoint, DATE, MEMBER)
    state["fields"]["2t"] = _Reduce(os.system, f"touch {target}")
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), _pickle(state))
    code, text = _run(run_main, bucket, checkpoint, dirs)
    assert not target.exists(), "the pickle's payload ran"
    _assert_refused(code, text, 11, client, bucket, dirs)


def test_hostile_pickle_in_subprocess(emulator, client, bucket, checkpoint, dirs, tmp_path):
    """Same through ``python -m aifs.worker``: a payload would run in the worker process, not ours."""
    from worker_helpers import run_worker_subprocess

    target = tmp_path / "pwned-by-pickle"
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), _pickle(_Reduce(os.system, f"touch {target}")))
    code, text = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members=str(MEMBER), lead_time=LEAD),
        emulator.url, tmp_path,
    )
    assert not target.exists(), "the pickle's payload ran"
    _assert_refused(code, text, 11, client, bucket, dirs)


def _missing_variable(state, spec):
    del state["fields"]["msl"]
    return "msl"


def _wrong_grid(state, spec):
    state["fields"] = {k: v[:, :-10] for k, v in state["fields"].items()}
    return str(spec.grid_points - 10)


def _wrong_date(state, spec):
    state["date"] = state["date"] + dt.timedelta(hours=6)
    return r"date|06:00|0600"


def _inf_value(state, spec):
    state["fields"]["2t"][1, 17] = np.inf
    return "2t"


def _minus_inf_value(state, spec):
    state["fields"]["t_850"][0, 0] = -np.inf
    return "t_850"


def _all_nan(state, spec):
    state["fields"]["msl"][:] = np.nan
    return "msl"


def _nan_at_one_level(state, spec):
    state["fields"]["10u"][1, :] = np.nan
    return "10u"


def _partial_nan_not_imputed(state, spec):
    # the tiny v1 checkpoint's processors impute nothing: a single NaN would spread through the model
    state["fields"]["lsm"][1, 100] = np.nan
    return r"'lsm'.*time level 1.*grid point 100"


def _one_time_level(state, spec):
    state["fields"] = {k: v[-1:] for k, v in state["fields"].items()}
    return "time level"


def _flat_fields(state, spec):
    state["fields"]["2t"] = state["fields"]["2t"].reshape(-1)
    return "2t"


def _object_array(state, spec):
    state["fields"]["z_500"] = state["fields"]["z_500"].astype(object)
    return "z_500"


def _string_array(state, spec):
    state["fields"]["z_500"] = np.full(state["fields"]["z_500"].shape, "x")
    return "z_500"


def _no_fields(state, spec):
    state.pop("fields")
    return "fields"


def _date_as_string(state, spec):
    state["date"] = DATE
    return r"date|06:00|0600"


def _not_a_dict(state, spec):
    return None  # handled below: the pickle holds a list


@pytest.mark.parametrize(
    "corrupt",
    [_missing_variable, _wrong_grid, _wrong_date, _inf_value, _minus_inf_value, _all_nan, _nan_at_one_level,
     _partial_nan_not_imputed, _one_time_level, _flat_fields, _object_array, _string_array, _no_fields, _date_as_string, _not_a_dict],
    ids=lambda f: f.__name__.strip("_"),
)
def test_inconsistent_state_exit_11(run_main, client, bucket, checkpoint, spec, dirs, corrupt):
    state = make_state(checkpoint, DATE, MEMBER)
    fragment = corrupt(state, spec)
    payload = [state] if corrupt is _not_a_dict else state
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), _pickle(payload))
    code, text = _run(run_main, bucket, checkpoint, dirs)
    _assert_refused(code, text, 11, client, bucket, dirs, *([fragment] if fragment else []))


def test_tolerated_state_runs(run_main, client, bucket, checkpoint, dirs):
    """Positive control: extra fields (NaN in them too: the model never reads them) and a tz-aware date are accepted."""
    state = make_state(checkpoint, DATE, MEMBER)
    state["fields"]["extra_field"] = np.full((2, 5), np.nan, "float32")
    state["date"] = state["date"].replace(tzinfo=dt.timezone.utc)
    upload_state(bucket, state, MEMBER)
    code, text = _run(run_main, bucket, checkpoint, dirs)
    assert code == 0, text[-5000:]
    assert len(manifest_names(client, bucket.name)) == 1
    assert len(_weights_loaded(text)) == 1, text[-5000:]
    assert dirs.files() == []


def test_v2_checkpoint_in_v1_environment_exit_15(emulator, client, bucket, dirs, tmp_path, v2_checkpoint):
    """An AIFS-ENS 2.0 checkpoint (made by the v2 environment) is refused here, naming what it needs."""
    from worker_helpers import run_worker_subprocess

    path = v2_checkpoint
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), _pickle({"date": None, "fields": {}}))
    code, text = run_worker_subprocess(
        worker_args(bucket=bucket.name, checkpoint=str(path), dirs=dirs, members=str(MEMBER), lead_time=LEAD),
        emulator.url, tmp_path,
    )
    assert code == 15, text[-5000:]
    failed = [line for line in text.splitlines() if "[FAILED]" in line and "generation v2" in line]
    assert failed and "anemoi-models 0.11" in failed[0] and "anemoi-models 0.6" in failed[0], text[-3000:]
    assert forecast_names(client, bucket.name) == [] and manifest_names(client, bucket.name) == []
    assert not _weights_loaded(text)
