"""Load an input-state pickle without executing what it asks for.

``pickle.load`` on bucket content runs arbitrary code (a ``__reduce__`` payload calling
``os.system`` is three lines). An input state is only dicts, lists, strings, numbers, datetimes
and numpy arrays, so the unpickler resolves exactly those globals and refuses everything else
before it can be called.
"""

from __future__ import annotations

import io
import pickle

from aifs.worker.errors import InputInvalid

#: (module, name) pairs an input state may reference. numpy moved its internals from
#: ``numpy.core`` to ``numpy._core`` in 2.0; pickles written by either are accepted.
ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool", "complex")
    }
    | {("collections", "OrderedDict")}
    | {("datetime", name) for name in ("datetime", "date", "time", "timedelta", "timezone")}
    | {("_codecs", "encode")}  # protocol-2 pickles encode bytes through it; it only converts str to bytes
    | {("numpy", "ndarray"), ("numpy", "dtype")}
    | {
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    }
)


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of an input state")


def loads_input_state(data: bytes) -> object:
    """Unpickle ``data`` with the allow-list; raises pickle.UnpicklingError for anything else."""
    return _AllowListUnpickler(io.BytesIO(data)).load()


def load_input_state(path: str, member: int) -> dict:
    """The input state in ``path`` as a dict; InputInvalid naming member and file on any problem."""
    try:
        with open(path, "rb") as f:
            state = _AllowListUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise InputInvalid(member, f"unsafe or corrupt pickle: {exc}", path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, MemoryError) as exc:
        raise InputInvalid(member, f"corrupt or truncated pickle ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(state, dict):
        raise InputInvalid(member, f"input state is a {type(state).__name__}, expected a dict with 'date' and 'fields'", path)
    return state
