"""aifs.worker.safe_pickle: input states load; nothing in a pickle can run code or reach a file."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from aifs.exitcodes import ExitCode
from aifs.worker.errors import InputInvalid, MemberError
from aifs.worker.safe_pickle import load_input_state

MEMBER = 7


def _state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "date": dt.datetime(2025, 6, 1, 0, 0),
        "fields": {
            "2t": rng.standard_normal((2, 50)).astype("float32") + 288,
            "msl": rng.standard_normal((2, 50)).astype("float64") + 101325,
            "t_850": np.full((2, 50), np.nan, dtype="float32"),
            "lsm": rng.integers(0, 2, (2, 50)).astype("int8"),
        },
    }


def _write(tmp_path: Path, data: bytes, name: str = "input_state_member_007.pkl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _assert_invalid(path: str, *fragments: str) -> InputInvalid:
    with pytest.raises(InputInvalid) as info:
        load_input_state(path, MEMBER)
    exc = info.value
    text = str(exc)
    assert "007" in text, text  # names the member
    assert path in text, text  # names the file
    for fragment in fragments:
        assert re.search(fragment, text, re.I), (fragment, text)
    assert exc.exit_code == ExitCode.INPUT_INVALID == 11
    return exc


def _assert_same(a: dict, b: dict) -> None:
    assert a["date"] == b["date"]
    assert set(a["fields"]) == set(b["fields"])
    for name in a["fields"]:
        np.testing.assert_array_equal(a["fields"][name], b["fields"][name])
        assert a["fields"][name].dtype == b["fields"][name].dtype


def test_error_types():
    assert issubclass(InputInvalid, MemberError)
    assert InputInvalid.exit_code == ExitCode.INPUT_INVALID


# --- what must load ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_valid_state_every_protocol(tmp_path, protocol):
    state = _state()
    loaded = load_input_state(_write(tmp_path, pickle.dumps(state, protocol=protocol)), MEMBER)
    assert isinstance(loaded, dict)
    _assert_same(loaded, state)


def test_synthetic_input_state_loads(tmp_path, checkpoint):
    from aifs.testing.synthetic import make_input_state, write_input_state

    state = make_input_state(checkpoint, dt.datetime(2025, 6, 1), seed=3)
    path = write_input_state(str(tmp_path / "input_state_member_007.pkl"), state)
    _assert_same(load_input_state(path, MEMBER), state)


@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy1_pickles_load(tmp_path, protocol):
    """Pickles written with numpy 1.x name ``numpy.core.multiarray`` (numpy 2 moved it to ``numpy._core``)."""
    data = pickle.dumps(_state(), protocol=protocol)  # protocols 2/3: GLOBAL opcodes, newline-terminated text
    old = data.replace(b"numpy._core.", b"numpy.core.")
    assert old != data
    _assert_same(load_input_state(_write(tmp_path, old), MEMBER), _state())


def test_extras_that_real_states_carry(tmp_path):
    """Tolerated content: tz-aware dates, lists/tuples, numpy scalars, nested dicts, strings."""
    state = _state()
    state["date"] = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)
    state["latitudes"] = np.linspace(-90, 90, 50)
    state["meta"] = {"levels": [850, 500], "grid": "O48", "scale": np.float32(1.5), "dims": (2, 50)}
    state["step"] = dt.timedelta(hours=6)
    loaded = load_input_state(_write(tmp_path, pickle.dumps(state)), MEMBER)
    assert loaded["date"] == state["date"]
    assert loaded["meta"]["scale"] == np.float32(1.5)
    assert loaded["step"] == dt.timedelta(hours=6)


# --- corrupt or wrong content --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.99, 1, 10])
def test_truncated(tmp_path, keep):
    data = pickle.dumps(_state(), protocol=pickle.HIGHEST_PROTOCOL)
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    _assert_invalid(_write(tmp_path, data[:cut]), "pickle")


def test_empty_file(tmp_path):
    _assert_invalid(_write(tmp_path, b""), "pickle")


@pytest.mark.parametrize(
    "data",
    [
        b"GRIB" + bytes(200) + b"7777",
        b'{"date": "2025-06-01", "fields": {}}',
        os.urandom(4096),
        b"\x80\x05\x95\xff\xff\xff\xff\xff\xff\xff\x7f",  # frame header claiming an absurd length
    ],
    ids=["grib", "json", "random", "huge-frame"],
)
def test_not_a_pickle(tmp_path, data):
    _assert_invalid(_write(tmp_path, data))


@pytest.mark.parametrize("value", [[1, 2, 3], "state", 42, None, (1, 2)], ids=repr)
def test_not_a_dict(tmp_path, value):
    _assert_invalid(_write(tmp_path, pickle.dumps(value)), "dict")


# --- hostile pickles -----------------------------------------------------------------------------


class _Reduce:
    """An object whose unpickling calls ``func(*args)``: the classic pickle payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(target: Path):
    import builtins
    import subprocess

    cmd = f"touch {target}"
    code = f"open({str(target)!r}, 'w').write('pwned')"
    return {
        "os.system": _Reduce(os.system, cmd),
        "subprocess.call": _Reduce(subprocess.call, ["touch", str(target)]),
        "builtins.exec": _Reduce(builtins.exec, code),
        "builtins.eval": _Reduce(builtins.eval, code),
        "builtins.open": _Reduce(builtins.open, str(target), "w"),
        "numpy.save": _Reduce(np.save, str(target) + ".npy", np.zeros(1)),
        "pathlib.touch": _Reduce(Path.touch, target),
    }


@pytest.mark.parametrize(
    "payload",
    ["os.system", "subprocess.call", "builtins.exec", "builtins.eval", "builtins.open", "numpy.save", "pathlib.touch"],
)
@pytest.mark.parametrize("where", ["top", "in-fields", "in-object-array"])
def test_hostile_payload_never_runs(tmp_path, payload, where):
    target = tmp_path / "pwned"
    evil = _hostile_payloads(target)[payload]
    state = _state()
    if where == "top":
        obj = evil
    elif where == "in-fields":
        state["fields"]["2t"] = evil
        obj = state
    else:  # an object-dtype array carrying the payload as an element
        arr = np.empty(1, dtype=object)
        arr[0] = evil
        state["fields"]["2t"] = arr
        obj = state
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = _write(tmp_path, pickle.dumps(obj, protocol=protocol))
        _assert_invalid(path, "unsafe|refused|not allowed|forbidden")
        assert not target.exists(), f"{payload} ran"
        assert not Path(str(target) + ".npy").exists(), f"{payload} ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input_state_member_007.pkl"]


def test_hostile_getattr_chain(tmp_path):
    """``getattr(<allowed class>, <dangerous attribute>)`` gadgets: getattr itself must be refused."""
    # getattr(numpy.ndarray, "tofile")(array, path) would write a file
    data = b"cbuiltins\ngetattr\n(cnumpy\nndarray\nVtofile\ntR."
    _assert_invalid(_write(tmp_path, data), "getattr")
    data = pickle.dumps(_Reduce(getattr, np.ndarray, "tofile"), protocol=2)
    _assert_invalid(_write(tmp_path, data), "getattr")


def test_hand_written_global_opcode(tmp_path):
    """A protocol-0 pickle written by hand (no Python object needed to produce it)."""
    target = tmp_path / "pwned"
    data = f"cposix\nsystem\n(Vtouch {target}\ntR.".encode()
    _assert_invalid(_write(tmp_path, data), "posix")
    assert not target.exists()
    data = f"cbuiltins\nexec\n(Vopen({str(target)!r}, 'w')\ntR.".encode()
    _assert_invalid(_write(tmp_path, data), "exec")
    assert not target.exists()


def test_find_class_refuses_lookalikes(tmp_path):
    """Allowed names in the wrong module, or submodules of allowed modules, stay refused."""
    for module, name in [("os", "dict"), ("numpy", "load"), ("numpy.lib.npyio", "load"), ("numpy", "fromfile"),
                         ("numpy.dtypes", "__getattr__"), ("datetime", "sys"), ("builtins", "__import__"),
                         ("builtins", "getattr"), ("copyreg", "_reconstructor"), ("numpy.testing", "assert_")]:
        data = f"c{module}\n{name}\n.".encode()
        _assert_invalid(_write(tmp_path, data))


def test_worker_never_uses_plain_pickle():
    """Static guard: no module of the worker unpickles bucket content with the stock loader."""
    import aifs.worker

    root = Path(aifs.worker.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bpickle\.Unpickler\(|allow_pickle\s*=\s*True|\bdill\.|\bjoblib\.load", code):
                offenders.append(f"{path.name}:{lineno}: {line.strip()}")
    assert not offenders, offenders
