"""Inputs cannot exhaust memory, and an invalid input never costs a model load (issue 11, point 4).

A pickle may claim no more memory than the checkpoint's input state needs (variables x time
levels x grid points x 8 bytes, with a margin): what asks for more is refused as exit 11 before
the allocation, naming member, file and the sizes asked and allowed. The checkpoint's metadata is
read before the weights; the weights load only for the first input that passes validation.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re
import struct
import subprocess
import threading
import time
import tracemalloc

import numpy as np
import pytest
from worker_helpers import (
    DATE,
    forecast_names,
    make_state,
    manifest_names,
    subprocess_env,
    tagged,
    upload_bytes,
    upload_state,
    worker_args,
    worker_command,
)

from aifs import layout
from aifs.exitcodes import ExitCode
from aifs.worker.errors import InputInvalid
from aifs.worker.safe_pickle import InputBudget, load_input_state

pytestmark = pytest.mark.timeout(300)

MEMBER = 7
GiB = 1 << 30
#: Python-level allocations a refused load may make (the file and the parser's bookkeeping).
REFUSAL_PEAK_BYTES = 16 << 20
LEAD = 12


# --- hostile pickles, written by hand: no Python object has to exist to produce them ------------


class _Forged:
    """Pickles as whatever ``__reduce__`` value it is given (the pickler never calls it)."""

    def __init__(self, *reduce_value):
        self.reduce_value = reduce_value

    def __reduce__(self):
        return self.reduce_value


def bytearray_bomb(count: int = 3, size: int = 2**31 - 1) -> bytes:
    """``[bytearray(size), ...]``: ``count`` distinct calls, a few bytes each (the issue's 6.4 GB bomb)."""
    data = b"\x80\x02]q\x00(cbuiltins\nbytearray\nq\x01J" + struct.pack("<i", size) + b"\x85q\x02Rq\x03"
    data += b"h\x01h\x02R" * (count - 1)  # memo GETs of the callable and its argument, then one more call
    return data + b"e."


def bytes_call_bomb(size: int = 2**31 - 1) -> bytes:
    """``bytes(size)``: REDUCE with an int argument."""
    return b"\x80\x02cbuiltins\nbytes\nJ" + struct.pack("<i", size) + b"\x85R."


def binbytes8_bomb(size: int = 2**36) -> bytes:
    """BINBYTES8 declaring 64 GiB followed by four bytes: the C unpickler allocates the length first."""
    return b"\x80\x04\x8e" + struct.pack("<Q", size) + b"xxxx."


def bytearray8_bomb(size: int = 2**33) -> bytes:
    return b"\x80\x05\x96" + struct.pack("<Q", size) + b"xxxx."


def numpy_shape_bomb(count: int = 2**28) -> bytes:
    """An object array of ``count`` elements pickled with one: numpy allocates the shape (and reads past the list)."""
    reconstruct = np._core.multiarray._reconstruct
    return pickle.dumps(_Forged(reconstruct, (np.ndarray, (0,), b"b"), (1, (count,), np.dtype(object), False, [1])),
                        protocol=2)


def numpy_reconstruct_bomb(count: int = 2**33) -> bytes:
    """numpy's ``_reconstruct`` asked for a 64 GiB float64 array directly."""
    reconstruct = np._core.multiarray._reconstruct
    return pickle.dumps(_Forged(reconstruct, (np.ndarray, (count,), np.dtype("f8"))), protocol=2)


def many_small_bytearrays(count: int = 6_000, size: int = 16384) -> bytes:
    """98 MB from 30 kB of pickle: many distinct calls, each small (those within the budget are granted)."""
    return bytearray_bomb(count, size)


def list_of_bytes_bomb(size: int = 4_000_000) -> bytes:
    """``list(bytes(size))``: one object per byte."""
    return (b"\x80\x02cbuiltins\nlist\ncbuiltins\nbytes\nJ" + struct.pack("<i", size) + b"\x85R\x85R.")


BOMBS = {
    "bytearray-list": bytearray_bomb,
    "bytes-call": bytes_call_bomb,
    "binbytes8-declared": binbytes8_bomb,
    "bytearray8-declared": bytearray8_bomb,
    "numpy-object-shape": numpy_shape_bomb,
    "numpy-reconstruct-shape": numpy_reconstruct_bomb,
    "many-distinct-bytearrays": many_small_bytearrays,
    "list-of-bytes": list_of_bytes_bomb,
}


def _write(tmp_path, data: bytes) -> str:
    path = tmp_path / layout.input_filename(MEMBER)
    path.write_bytes(data)
    return str(path)


def _sizes_named(text: str) -> bool:
    return bool(re.search(r"asks for at least [\d,]+ bytes .*more than the [\d,]+ bytes .*allowed", text))


# --- in process: the loader refuses before allocating --------------------------------------------


@pytest.mark.parametrize("make", BOMBS.values(), ids=BOMBS.keys())
def test_bomb_refused_before_allocating(tmp_path, spec_budget, make):
    path = _write(tmp_path, make())
    started = time.perf_counter()
    with pytest.raises(InputInvalid) as info:
        load_input_state(path, MEMBER, spec_budget)
    seconds = time.perf_counter() - started
    tracemalloc.start()  # again, measured: tracemalloc slows the allocations it counts
    try:
        with pytest.raises(InputInvalid):
            load_input_state(path, MEMBER, spec_budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # what asks for one huge object gets nothing; many small ones get at most the budget
    allowed_peak = REFUSAL_PEAK_BYTES + (spec_budget.limit if make is many_small_bytearrays else 0)
    text = str(info.value)
    assert info.value.exit_code == ExitCode.INPUT_INVALID == 11
    assert "member 007" in text.lower() or "member 7" in text.lower(), text
    assert path in text, text
    assert _sizes_named(text), text
    assert f"{spec_budget.limit:,}" in text, text
    assert seconds < 1.0, f"{seconds:.2f} s to refuse"
    assert peak < allowed_peak, f"{peak / 1e6:.1f} MB allocated to refuse {text}"


def test_checkpoint_budget_is_sized_from_the_metadata(spec, spec_budget):
    values = len(spec.input_variables) * spec.time_levels * spec.grid_points
    assert values * 8 <= spec_budget.limit < values * 8 * 4 + (64 << 20) + 1
    for fragment in (f"{len(spec.input_variables)} variables", f"{spec.time_levels} time levels",
                     f"{spec.grid_points} grid points", "8 bytes"):
        assert fragment in spec_budget.basis


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_real_states_fit_the_budget(tmp_path, checkpoint, spec_budget, protocol):
    """Positive control: float64 states with extra fields load under the checkpoint's budget, any protocol."""
    state = make_state(checkpoint, DATE, MEMBER)
    state["fields"] = {k: v.astype("float64") for k, v in state["fields"].items()}
    n = next(iter(state["fields"].values())).shape[-1]
    state["latitudes"], state["longitudes"] = np.linspace(-90, 90, n), np.linspace(0, 360, n)
    loaded = load_input_state(_write(tmp_path, pickle.dumps(state, protocol=protocol)), MEMBER, spec_budget)
    for name, values in state["fields"].items():
        np.testing.assert_array_equal(loaded["fields"][name], values)


@pytest.mark.parametrize("protocol", [4, 5])
def test_state_just_under_the_budget_loads(tmp_path, checkpoint, protocol):
    """Each payload counts once: a state whose arrays fill nearly the whole budget still loads."""
    state = make_state(checkpoint, DATE, MEMBER)
    data = pickle.dumps(state, protocol=protocol)
    loaded = load_input_state(_write(tmp_path, data), MEMBER, InputBudget(len(data) + (64 << 10), "test"))
    assert set(loaded["fields"]) == set(state["fields"])


def test_shared_references_are_cheap(tmp_path):
    """One large object referenced many times costs one object: a state may repeat a reference."""
    big = bytearray(4 << 20)
    state = {"date": dt.datetime(2025, 6, 1), "fields": {}, "repeats": [big] * 10_000}
    loaded = load_input_state(_write(tmp_path, pickle.dumps(state, protocol=4)), MEMBER, InputBudget(16 << 20, "test"))
    assert len(loaded["repeats"]) == 10_000 and all(r is loaded["repeats"][0] for r in loaded["repeats"])


def test_file_larger_than_the_budget_is_not_read(tmp_path):
    path = _write(tmp_path, pickle.dumps({"date": None, "fields": {}, "pad": bytes(2 << 20)}))
    with pytest.raises(InputInvalid, match=r"input file is [\d,]+ bytes .*more than the 1,000,000 bytes"):
        load_input_state(path, MEMBER, InputBudget(1_000_000, "test"))


@pytest.mark.parametrize("count", [3, 1000])
def test_object_array_with_a_short_list_is_refused(tmp_path, count):
    """numpy reads one list item per element without checking: a short list would crash the worker."""
    path = _write(tmp_path, numpy_shape_bomb(count))
    with pytest.raises(InputInvalid, match="list of 1 elements, expected"):
        load_input_state(path, MEMBER)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\x80\x02]r\xff\xff\xff\xff.", "memo index"),  # the C unpickler sizes its memo table by this
        (b"\x80\x02cbuiltins\nstr\n]q\x00h\x00a\x85R.", "refused to call builtins.str"),  # repr of shared refs
        (b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00abX\x03\x00\x00\x00hex\x86R.", "refused to call _codecs.encode"),
        (b"\x80\x02cnumpy\nndarray\nJ\x00\x00\x00\x40\x85R.", "refused to call numpy.ndarray"),
        (b"\x80\x02\x82\x01.", "refused opcode EXT1"),
        (b"\x80\x02cbuiltins\nbytearray\n]J\xff\xff\xff\x7faR.", "not a tuple"),  # bytearray(*[2**31-1])
        (b"\x80\x02cbuiltins\nbytes\nJ\xff\xff\xff\x7f\x85\x81.", "asks for at least 2,147,"),  # bytes.__new__
    ],
    ids=["memo-index", "str-of-container", "codec-chain", "ndarray-call", "extension-registry", "list-as-arguments",
         "newobj"],
)
def test_allocation_gadgets_refused(tmp_path, data, problem):
    with pytest.raises(InputInvalid, match=re.escape(problem)):
        load_input_state(_write(tmp_path, data), MEMBER)


# --- through the real worker CLI -----------------------------------------------------------------


def _run_measured(args: list[str], emulator_url: str, cwd, timeout: float = 240) -> tuple[int, str, int]:
    """``python -m aifs.worker ARGS``: (exit code, output, the worker process's own peak RSS in bytes)."""
    proc = subprocess.Popen(worker_command(args), env=subprocess_env(emulator_url), cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the test process's
    finally:
        killer.cancel()
        proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, out, usage.ru_maxrss * 1024  # Linux reports kilobytes


def _weights_loaded(text: str) -> list[str]:
    return [line for line in tagged(text, "[MODEL]") if re.search(r"weights of .* loaded", line)]


@pytest.fixture(scope="module")
def valid_run(emulator, checkpoint, tmp_path_factory):
    """One valid member through the CLI: the worker's baseline (weights, forecast, upload)."""
    from worker_helpers import Dirs

    from aifs.testing.emulator import anonymous_client

    tmp = tmp_path_factory.mktemp("valid-run")
    bucket = anonymous_client(emulator.url).create_bucket("t-budget-valid")
    upload_state(bucket, make_state(checkpoint, DATE, 1), 1)
    dirs = Dirs(tmp / "scratch")
    code, out, peak = _run_measured(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="1",
                                                lead_time=LEAD), emulator.url, tmp)
    assert code == 0, out[-5000:]
    assert len(_weights_loaded(out)) == 1, out[-5000:]
    return peak


CLI_BOMBS = {3: bytearray_bomb, 4: binbytes8_bomb, 5: numpy_shape_bomb}


def test_bombs_refused_by_the_worker(emulator, client, bucket, checkpoint, dirs, tmp_path, valid_run):
    """Members 3-5 are bombs: exit 11 for each, in well under a second, with no memory and no model load."""
    for member, make in CLI_BOMBS.items():
        upload_bytes(bucket, layout.input_object(DATE, member), make())
    code, out, peak = _run_measured(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="3-5",
                                                lead_time=LEAD), emulator.url, tmp_path)
    assert code == ExitCode.INPUT_INVALID, out[-5000:]
    for member in CLI_BOMBS:
        failed = [line for line in tagged(out, "[FAILED]") if re.search(rf"member\s*0*{member}\b", line, re.I)]
        assert failed and layout.input_filename(member) in failed[0] and _sizes_named(failed[0]), out[-5000:]
        refused = [line for line in tagged(out, "[INPUT]") if f"member {member:03d}: refused" in line]
        assert refused, out[-5000:]
        seconds = float(re.search(r"in ([\d.]+) s", refused[0]).group(1))
        assert seconds < 1.0, refused[0]
    assert peak < valid_run + GiB, f"bombs peaked at {peak / 1e9:.2f} GB, a valid member at {valid_run / 1e9:.2f} GB"
    # the checkpoint's metadata was read (the budget comes from it), its weights never were
    assert any("metadata" in line for line in tagged(out, "[MODEL]")), out[-5000:]
    assert _weights_loaded(out) == [], out[-5000:]
    assert forecast_names(client, bucket.name) == [] and manifest_names(client, bucket.name) == []
    assert dirs.files() == []


def test_weights_load_for_the_first_valid_input(run_main, client, bucket, checkpoint, dirs):
    """Member 2 is invalid, member 3 valid: the weights load after 2 is refused, once, for 3."""
    bad = make_state(checkpoint, DATE, 2)
    del bad["fields"]["msl"]
    upload_state(bucket, bad, 2)
    upload_state(bucket, make_state(checkpoint, DATE, 3), 3)
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members="2,3",
                                      lead_time=LEAD))
    assert code == ExitCode.INPUT_INVALID, text[-5000:]
    lines = text.splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r}:\n" + text[-5000:]
        return found[0]

    metadata = first(r"\[MODEL\] .*metadata")
    refused = first(r"\[FAILED\] member 0*2\b.*msl")
    weights = first(r"\[MODEL\] weights of .* loaded")
    manifest = first(r"\[MANIFEST\] .*" + re.escape(layout.manifest_object(DATE, 3)))
    assert metadata < refused < weights < manifest, "\n".join(lines[metadata:manifest + 1])
    assert len(_weights_loaded(text)) == 1
    assert len(manifest_names(client, bucket.name)) == 1


def test_oversized_input_refused_before_download(run_main, monkeypatch, client, bucket, checkpoint, dirs, spec):
    """An input object larger than the budget is refused from its size alone: nothing is downloaded."""
    from aifs.worker import model

    monkeypatch.setattr(model, "INPUT_SLACK_BYTES", 0)  # the tiny grid's budget without slack: a few MB
    limit = len(spec.input_variables) * spec.time_levels * spec.grid_points * 8 * model.INPUT_MARGIN
    upload_bytes(bucket, layout.input_object(DATE, MEMBER), bytes(limit + 1))
    code, text = run_main(worker_args(bucket=bucket.name, checkpoint=checkpoint, dirs=dirs, members=str(MEMBER),
                                      lead_time=LEAD))
    assert code == ExitCode.INPUT_INVALID, text[-5000:]
    failed = tagged(text, "[FAILED]")
    assert failed and f"gs://{bucket.name}/{layout.input_object(DATE, MEMBER)}" in failed[0], text[-5000:]
    assert f"{limit + 1:,} bytes" in failed[0] and f"{limit:,} bytes" in failed[0], failed[0]
    assert "[DOWNLOAD]" not in text and "[INPUT]" not in text
    assert _weights_loaded(text) == []
    assert dirs.files() == []


@pytest.fixture(scope="session")
def spec_budget(checkpoint) -> InputBudget:
    """The budget the worker computes for the tiny checkpoint, from its metadata alone."""
    from aifs.worker.model import Model

    return Model(checkpoint, device="cpu", precision=None, num_chunks=None).spec.input_budget()
