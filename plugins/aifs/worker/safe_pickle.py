"""Load an input-state pickle without executing what it asks for, and without letting it exhaust memory.

``pickle.load`` on bucket content runs arbitrary code (a ``__reduce__`` payload calling
``os.system`` is three lines). An input state is only dicts, lists, strings, numbers, datetimes
and numpy arrays, so the unpickler resolves exactly those globals and refuses everything else
before it can be called.

Blocking code is not enough: a 212-byte pickle of ``[bytearray(2**31-1)] * 3`` built from distinct
calls makes a stock unpickler allocate 6.4 GB before anyone can look at the result, and
``BINBYTES8``/``BYTEARRAY8`` carry a length the C unpickler allocates before reading the data.
So every load has a budget (:class:`InputBudget`, from what the checkpoint's state needs) and is
refused, before the allocation, once what the pickle claims would exceed it:

1. the file's size, before it is read;
2. a pre-scan of the opcode stream (pickletools' opcode table and argument readers: parses,
   builds nothing, skips payloads) charges every payload and every opcode, and refuses a declared
   length larger than the budget or than the rest of the file, a frame larger than the file and a
   memo index no real pickler writes;
3. the unpickling itself (the pure-Python unpickler, whose opcodes can be intercepted; the C one
   only lets find_class be overridden) charges, before each call, what that call would allocate:
   ``bytearray(n)``, ``bytes(n)``, ``list(x)``, numpy's ``_reconstruct`` with a shape and
   ``ndarray.__setstate__`` with a shape, dtype and data. A callable without a known cost is refused.

Repeated references to one object (a memo ``GET``) cost an opcode, not the object again: a list of
one large array referenced 1000 times is fine, a list of 1000 distinct ones is not.
"""

from __future__ import annotations

import _codecs
import collections
import dataclasses
import datetime
import io
import math
import operator
import os
import pickle
import pickletools
import struct
import sys

import numpy as np

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

MiB = 1 << 20
#: Python objects one opcode may create besides its payload: an int, a list slot, a dict entry, a memo entry.
OPCODE_BYTES = 64
#: An input state of arrays is a few thousand opcodes; a flood of tiny ones only costs time to scan.
MAX_OPCODES = 1_000_000
#: What materialising one element of an iterable costs (``list(bytes)``: a pointer; ``list(ndarray)``: a scalar object).
ITEM_BYTES = 128
#: Without a checkpoint to size the state from: a state is its file's payloads, plus a protocol-2 copy.
FILE_FACTOR, FILE_SLACK = 4, 64 * MiB
#: Encodings ``_codecs.encode`` may be called with (pickle's protocol 2 writes bytes as ``encode(str, 'latin1')``),
#: with the most bytes one character can become.
_ENCODINGS = {"latin1": 1, "latin-1": 1, "iso-8859-1": 1, "iso8859-1": 1, "l1": 1, "ascii": 1, "us-ascii": 1,
              "utf-8": 4, "utf8": 4}
#: Opcodes no pickler writes for an input state and that reach outside the allow-list's checks:
#: extension-registry lookups (a cache that bypasses find_class), persistent ids, out-of-band
#: buffers, and the protocol-0/1 class instantiation opcodes.
_REFUSED_OPCODES = {"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER", "INST", "OBJ"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_multiarray, _numeric = np._core.multiarray, np._core.numeric  # numpy >= 2 (numpy.core is a deprecated alias)


def human(n: int) -> str:
    """Bytes for a person: ``6.4 GB``, ``71.2 MB``, ``212 B``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class InputBudget:
    """The most memory an input state may claim, and where that number comes from (said in refusals)."""

    limit: int
    basis: str

    @classmethod
    def for_file(cls, size: int) -> "InputBudget":
        """Without a checkpoint: a state cannot legitimately be much larger than its own file."""
        return cls(FILE_FACTOR * size + FILE_SLACK, f"{FILE_FACTOR} x the file's {human(size)} + {FILE_SLACK // MiB} MiB")


class InputTooLarge(Exception):
    """The pickle claims more than its budget; raised before the allocation that would exceed it."""

    def __init__(self, asked: int, budget: InputBudget, what: str):
        self.asked, self.budget, self.what = asked, budget, what
        super().__init__(
            f"input state asks for at least {asked:,} bytes ({human(asked)}; {what}), more than the "
            f"{budget.limit:,} bytes ({human(budget.limit)}) allowed ({budget.basis}): refused before allocating it"
        )


class _Meter:
    """The running total of what the pickle claims, checked before each claim is granted."""

    def __init__(self, budget: InputBudget):
        self.budget, self.used = budget, 0

    def check(self, extra: int, what: str) -> None:
        if self.used + extra > self.budget.limit:
            raise InputTooLarge(self.used + extra, self.budget, what)

    def charge(self, extra: int, what: str) -> None:
        self.check(extra, what)
        self.used += extra


class _BoundedFile:
    """A file whose reads cannot ask for more than is left in it (BufferedReader.read(n) allocates n first)."""

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def remaining(self) -> int:
        return self._size - self._f.tell()

    def require(self, n: int) -> None:
        left = self.remaining()
        if n > left:
            raise pickle.UnpicklingError(f"needs {n:,} bytes ({human(n)}) at offset {self._f.tell()} but only "
                                         f"{left:,} remain in the file: truncated or forged")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self.require(n)
        return self._f.read(n)

    def readinto(self, buf) -> int:
        self.require(memoryview(buf).nbytes)
        return self._f.readinto(buf)

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(limit)

    def tell(self) -> int:
        return self._f.tell()


#: Length prefixes of the opcodes that carry counted data (BINBYTES8, BYTEARRAY8, BINUNICODE, LONG4...).
_COUNTED = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
            pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}


def _prescan(f, size: int, meter: _Meter) -> None:
    """Walk the opcodes, building nothing: charge payloads and opcodes, refuse impossible lengths.

    Like ``pickletools.genops``, with its argument readers, except that counted data is skipped
    rather than read: its declared length is checked against the budget and the rest of the file,
    which costs nothing however large the file.
    """
    reader = _BoundedFile(f, size)
    for _ in range(MAX_OPCODES):
        pos = f.tell()
        if pos >= size:
            raise pickle.UnpicklingError(f"the pickle ends at offset {pos} without its STOP opcode: truncated")
        code = reader.read(1)
        opcode = pickletools.code2op.get(code.decode("latin-1"))
        if opcode is None:
            raise pickle.UnpicklingError(f"unknown opcode {code!r} at offset {pos}: not a pickle")
        name, arg, payload = opcode.name, opcode.arg, 0
        if name in _REFUSED_OPCODES:
            raise pickle.UnpicklingError(f"refused opcode {name} at offset {pos}: not part of an input state")
        if arg is not None and arg.n in _COUNTED:
            fmt = _COUNTED[arg.n]
            (payload,) = struct.unpack(fmt, reader.read(struct.calcsize(fmt)))
            if payload < 0:
                raise pickle.UnpicklingError(f"{name} at offset {pos} declares a negative length: forged")
            meter.check(payload, f"a {payload:,}-byte {arg.name} declared at offset {pos}")
            reader.require(payload)
            f.seek(payload, io.SEEK_CUR)
        elif arg is not None:
            value = arg.reader(reader)
            if isinstance(value, (bytes, str)):
                payload = sys.getsizeof(value)  # protocol-0 text arguments
            elif name == "FRAME" and value > reader.remaining():
                raise pickle.UnpicklingError(f"frame at offset {pos} declares {value:,} bytes ({human(value)}) but only "
                                             f"{reader.remaining():,} remain in the file: truncated or forged")
            elif name in _MEMO_PUTS and value > size:
                # picklers number memo entries 0, 1, 2...; the C unpickler sizes its memo table by the index
                raise pickle.UnpicklingError(f"memo index {value:,} at offset {pos} in a {size:,}-byte file: forged")
        meter.charge(OPCODE_BYTES + payload, f"{name} at offset {pos}")
        if name == "STOP":
            return
    raise pickle.UnpicklingError(f"more than {MAX_OPCODES:,} opcodes: an input state of arrays needs a few thousand")


# --- what a call would allocate, computed from its arguments before it is made -------------------


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _refuse(func, why: str):
    raise pickle.UnpicklingError(f"refused to call {_qualname(func)}: {why}")


def _count(x, func) -> int:
    """How many objects iterating ``x`` creates."""
    if isinstance(x, np.ndarray):
        return int(x.size)
    try:
        return len(x)
    except TypeError:
        _refuse(func, f"argument of type {type(x).__name__} has no length")


def _buffer_bytes(x, func) -> int:
    """What ``bytes(x)``/``bytearray(x)`` allocates."""
    if isinstance(x, bool):
        return 1
    if isinstance(x, int):
        return max(x, 0)
    if isinstance(x, str):
        return 4 * len(x)
    try:
        return memoryview(x).nbytes
    except TypeError:
        return _count(x, func)


def _shape_count(shape) -> int | None:
    """Elements in ``shape``, or None when numpy will refuse the shape itself."""
    try:
        dims = [operator.index(shape)] if not isinstance(shape, (tuple, list)) else [operator.index(d) for d in shape]
    except TypeError:
        return None
    return math.prod(dims) if all(d >= 0 for d in dims) else None


def _dtype(x) -> np.dtype | None:
    try:
        return x if isinstance(x, np.dtype) else np.dtype(x)
    except Exception:  # numpy raises several kinds for what is not a dtype; the call would fail the same way
        return None


def _cost_bytes(func, args, kwargs):
    return _buffer_bytes(args[0], func) if args else 0, f"{_qualname(func)}({_arg(args)})"


def _cost_items(func, args, kwargs):
    return ITEM_BYTES * _count(args[0], func) if args else 0, f"{_qualname(func)}() of {_arg(args)}"


def _cost_str(func, args, kwargs):
    if args and not isinstance(args[0], (str, bytes, bytearray, int, float)):
        _refuse(func, f"would write out a {type(args[0]).__name__}, which can repeat shared objects without bound")
    return (4 * len(args[0]) if args and isinstance(args[0], (str, bytes, bytearray)) else 0), f"str({_arg(args)})"


def _cost_scalar(func, args, kwargs):
    """int/float/complex/bool and the datetime types: small results, at most the size of a text argument."""
    return sum(len(a) for a in args if isinstance(a, (str, bytes, bytearray))), f"{_qualname(func)}()"


def _cost_encode(func, args, kwargs):
    text = args[0] if args else None
    encoding = args[1] if len(args) > 1 else "utf-8"
    factor = _ENCODINGS.get(encoding.lower().replace("_", "-")) if isinstance(encoding, str) else None
    if not isinstance(text, str) or factor is None or len(args) > 3:
        _refuse(func, f"only encode(str, 'latin1'|'ascii'|'utf-8') is part of a pickle, got {_arg(args)}")
    return factor * len(text), f"_codecs.encode of {len(text):,} characters"


def _cost_reconstruct(func, args, kwargs):
    """numpy's ``_reconstruct(ndarray, shape, dtype)`` allocates shape x itemsize (pickles use shape (0,))."""
    if len(args) != 3 or args[0] is not np.ndarray:
        _refuse(func, f"expected (numpy.ndarray, shape, dtype), got {_arg(args)}")
    count, dtype = _shape_count(args[1]), _dtype(args[2])
    if count is None or dtype is None:
        _refuse(func, f"shape {args[1]!r:.80} or dtype {args[2]!r:.80} is not one")
    return count * dtype.itemsize, _array_text(args[1], dtype)


def _array_text(shape, dtype: np.dtype) -> str:
    return f"numpy array of shape {tuple(shape) if isinstance(shape, (tuple, list)) else shape} and dtype {dtype}"


def _cost_numpy_scalar(func, args, kwargs):
    dtype = _dtype(args[0]) if args else None
    return (dtype.itemsize if dtype is not None else 0), "numpy scalar"


def _cost_small(func, args, kwargs):
    """numpy.dtype, numpy's DType classes, _frombuffer (a view of a buffer already charged)."""
    return 0, _qualname(func)


def _cost_ndarray(func, args, kwargs):
    _refuse(func, "arrays are rebuilt through numpy's _reconstruct or _frombuffer, never by calling numpy.ndarray")


def _arg(args) -> str:
    text = ", ".join(f"{a!r:.40}" if isinstance(a, (int, str, float)) else type(a).__name__ for a in args[:4])
    return text if len(args) <= 4 else text + ", ..."


_COSTS = {
    bytes: _cost_bytes,
    bytearray: _cost_bytes,
    list: _cost_items,
    tuple: _cost_items,
    set: _cost_items,
    frozenset: _cost_items,
    dict: _cost_items,
    collections.OrderedDict: _cost_items,
    str: _cost_str,
    int: _cost_scalar,
    float: _cost_scalar,
    complex: _cost_scalar,
    bool: _cost_scalar,
    datetime.datetime: _cost_scalar,
    datetime.date: _cost_scalar,
    datetime.time: _cost_scalar,
    datetime.timedelta: _cost_scalar,
    datetime.timezone: _cost_scalar,
    _codecs.encode: _cost_encode,
    np.ndarray: _cost_ndarray,
    np.dtype: _cost_small,
    _multiarray._reconstruct: _cost_reconstruct,
    _multiarray.scalar: _cost_numpy_scalar,
    _numeric._frombuffer: _cost_small,
}


def _call_cost(func, args, kwargs) -> tuple[int, str]:
    cost = _COSTS.get(func) if _hashable(func) else None
    if cost is None and isinstance(func, type) and issubclass(func, np.dtype):
        cost = _cost_small  # numpy.dtypes.Float32DType and friends
    if cost is None:
        _refuse(func, "not a constructor of an input state")
    if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
        # the pure-Python unpickler would unpack any iterable (``bytearray(*[2**31])``); picklers write tuples
        _refuse(func, f"arguments are a {type(args).__name__}, not a tuple")
    if kwargs:
        _refuse(func, "keyword arguments are not part of an input state")
    size, what = cost(func, args, kwargs)
    return OPCODE_BYTES + size, what


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _charge_array_state(state, meter: _Meter) -> None:
    """Charge what ``ndarray.__setstate__(([version,] shape, dtype, is_fortran, data))`` allocates beyond ``data``."""
    if not isinstance(state, tuple) or len(state) not in (4, 5) or not isinstance(state[-3], np.dtype) \
            or _shape_count(state[-4]) is None:
        raise pickle.UnpicklingError(f"array state is not ([version,] shape, dtype, is_fortran, data): {_arg(state)}")
    shape, dtype, _, data = state[-4:]
    count = _shape_count(shape)
    nbytes = count * dtype.itemsize
    what = _array_text(shape, dtype)
    if dtype.hasobject:
        meter.charge(nbytes, what)
        # numpy allocates the array, then reads one list item per element without checking the list's
        # length: a short list reads past its end and crashes the interpreter (numpy 2.4)
        if not isinstance(data, list) or len(data) != count:
            got = f"a list of {len(data):,}" if isinstance(data, list) else f"a {type(data).__name__}"
            raise pickle.UnpicklingError(f"{what} pickled with {got} elements, expected {count:,}: forged")
    elif isinstance(data, (bytes, str)) and len(data) == nbytes and not (isinstance(data, bytes) and dtype.isnative):
        meter.charge(nbytes, what)  # converted or byte-swapped into a copy
    # otherwise numpy keeps the bytes (or copies a small one) after checking their length, or refuses
    # data whose size does not match the shape before allocating


class _BudgetUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with the allow-list and the budget on every opcode that allocates."""

    def __init__(self, file: _BoundedFile, meter: _Meter):
        super().__init__(file)
        self._bounded, self._meter = file, meter

    def find_class(self, module: str, name: str):
        # numpy.dtypes.Float32DType and friends; a plain name only (protocol 4 resolves dotted paths)
        dtype_class = module == "numpy.dtypes" and name.isidentifier() and name.endswith("DType")
        if (module, name) in ALLOWED_GLOBALS or dtype_class:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: not part of an input state")

    def _charge_call(self, func, args, kwargs=None) -> None:
        size, what = _call_cost(func, args, kwargs)
        self._meter.charge(size, what)

    def load_reduce(self):
        self._charge_call(self.stack[-2], self.stack[-1])
        super().load_reduce()

    def load_newobj(self):
        self._charge_call(self.stack[-2], self.stack[-1])
        super().load_newobj()

    def load_newobj_ex(self):
        self._charge_call(self.stack[-3], self.stack[-2], self.stack[-1])
        super().load_newobj_ex()

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.ndarray):
            _charge_array_state(state, self._meter)
        super().load_build()

    def load_bytearray8(self):
        # the stock implementation allocates the declared length before reading: check it against the
        # file first (the pre-scan charged it to the budget already)
        (size,) = struct.unpack("<Q", self.read(8))
        frame = self._unframer.current_frame
        if frame is None:
            self._bounded.require(size)
        elif size > len(frame.getvalue()) - frame.tell():
            raise pickle.UnpicklingError(f"a {size:,}-byte bytearray overruns its frame: truncated or forged")
        data = bytearray(size)
        self.readinto(data)
        self.append(data)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _load(f, size: int, budget: InputBudget) -> object:
    meter = _Meter(budget)
    _prescan(f, size, meter)
    f.seek(0)
    return _BudgetUnpickler(_BoundedFile(f, size), meter).load()


def loads_input_state(data: bytes, budget: InputBudget | None = None) -> object:
    """Unpickle ``data`` with the allow-list and the budget; raises pickle.UnpicklingError or InputTooLarge."""
    return _load(io.BytesIO(data), len(data), budget or InputBudget.for_file(len(data)))


def check_input_size(size: int, budget: InputBudget, member: int, path: str) -> None:
    """Refuse an input file larger than the state it may hold, before it is downloaded or read."""
    if size > budget.limit:
        raise InputInvalid(member, f"input file is {size:,} bytes ({human(size)}), more than the {budget.limit:,} "
                           f"bytes ({human(budget.limit)}) an input state may take ({budget.basis}): refused unread", path)


def load_input_state(path: str, member: int, budget: InputBudget | None = None) -> dict:
    """The input state in ``path`` as a dict; InputInvalid naming member and file on any problem.

    ``budget``: the most the state may claim (``ModelSpec.input_budget()``); without one, a bound
    derived from the file's own size.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            budget = budget or InputBudget.for_file(size)
            check_input_size(size, budget, member, path)
            state = _load(f, size, budget)
    except InputTooLarge as exc:
        raise InputInvalid(member, str(exc), path) from None
    except pickle.UnpicklingError as exc:
        raise InputInvalid(member, f"unsafe or corrupt pickle: {exc}", path) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, MemoryError,
            struct.error, RecursionError) as exc:
        raise InputInvalid(member, f"corrupt or truncated pickle ({type(exc).__name__}: {exc})", path) from None
    if not isinstance(state, dict):
        raise InputInvalid(member, f"input state is a {type(state).__name__}, expected a dict with 'date' and 'fields'", path)
    return state
