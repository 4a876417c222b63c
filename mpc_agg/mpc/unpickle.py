"""Unpickling what peer parties send, without running code chosen by the peer.

README, "Security model" (*Links*, *Who may talk*); docs/design.md, "Security model": MPyC
``pickle.loads`` every message a party link carries (``Runtime.transfer`` and the secure-array
input, output and reshare steps). Plain ``pickle`` calls any importable function the bytes
name, so one party (or anyone holding a party certificate) could run code on another.
:func:`install` replaces the ``pickle`` that ``mpyc.runtime`` uses with :data:`SAFE_PICKLE`,
whose ``loads`` is :func:`restricted_loads`:

- Opcodes: only those protocol 4 emits, checked in one pass before the C unpickler runs, which
  also refuses lengths beyond the data (a 10-byte pickle can otherwise make it allocate and
  zero tens of GB, CPython gh-115952).
- Globals: exactly the ones MPyC 0.11 and the protocol pickle, each behind a wrapper that
  checks its arguments (:data:`ALLOWLIST`); any other global is refused by name.
- numpy arrays and scalars of bool, int, uint, float or complex dtypes, plus the object arrays
  of Python ints that MPyC's secure arrays send (``thresha.np_random_split`` rows). The
  dtype's pickled state must equal a canonical dtype's exactly: numpy accepts a forged state
  (object flags on ``uint64``, fields on a plain type) that makes raw bytes pointers.
- gmpy2 ``mpz``, and MPyC elements and arrays of the fields in :data:`FIELD_MODULI` only
  (each new modulus would be primality-tested and cached forever).
- Values: the result is walked once (O(objects), never O(bytes)) and anything but
  :data:`None`, bool, int, float, str, bytes, bytearray, tuple, list, dict, set, frozenset and
  the kinds above is refused, as are cycles and nesting deeper than :data:`MAX_DEPTH`.

Every failure, refused or merely malformed (truncated, trailing bytes, numpy's own errors),
raises :class:`ForbiddenPickle`, a :class:`pickle.UnpicklingError`: callers catch one type.
:data:`SAFE_PICKLE` also pins ``dumps`` to protocol 4, so the parties send numpy arrays the
one way the allowlist knows whatever the Python version (3.14 defaults to 5).
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

import gmpy2  # type: ignore[import-untyped]
import numpy as np

from mpc_agg.core.field import P

PROTOCOL: int = 4
"""The pickle protocol :data:`SAFE_PICKLE` sends (Python 3.11's default)."""

MAX_DEPTH: int = 64
"""Deepest nesting of containers accepted; protocol messages are three deep."""

FIELD_MODULI: frozenset[int] = frozenset({P})
"""Prime fields whose MPyC elements and arrays may arrive: the one the engine uses."""

_MALFORMED_DETAIL = 200  # characters of the underlying error kept in the message


class ForbiddenPickle(pickle.UnpicklingError):
    """A peer's pickle was refused: a global off the allowlist, a value of a refused type,
    or bytes that are not one well-formed pickle."""


def _short(value: object) -> str:
    """A bounded repr of peer data for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# opcodes --------------------------------------------------------------------------------------

# Every opcode protocol 4 emits for the allowed kinds -> the size of its argument, or -n for an
# n-byte length followed by that many bytes. CPython's C unpickler (3.11 here) grows its memo
# to any index PUT, BINPUT or LONG_BINPUT names (CPython gh-115952: the 7 bytes
# b"]r\xff\xff\xff\x7f." allocate and zero 32 GB), and allocates a declared length before
# reading it, so those opcodes (never emitted: protocol 4 memoizes with MEMOIZE) and lengths
# beyond the data are refused before the unpickler runs. So are text and protocol-5 opcodes.
_ARG_SIZES: dict[bytes, int] = {
    pickle.PROTO: 1,
    pickle.FRAME: 8,
    pickle.STOP: 0,
    pickle.MEMOIZE: 0,
    pickle.BINGET: 1,
    pickle.LONG_BINGET: 4,
    pickle.NONE: 0,
    pickle.NEWTRUE: 0,
    pickle.NEWFALSE: 0,
    pickle.BININT: 4,
    pickle.BININT1: 1,
    pickle.BININT2: 2,
    pickle.LONG1: -1,
    pickle.LONG4: -4,
    pickle.BINFLOAT: 8,
    pickle.SHORT_BINUNICODE: -1,
    pickle.BINUNICODE: -4,
    pickle.BINUNICODE8: -8,
    pickle.SHORT_BINBYTES: -1,
    pickle.BINBYTES: -4,
    pickle.BINBYTES8: -8,
    pickle.EMPTY_TUPLE: 0,
    pickle.TUPLE1: 0,
    pickle.TUPLE2: 0,
    pickle.TUPLE3: 0,
    pickle.MARK: 0,
    pickle.TUPLE: 0,
    pickle.POP: 0,
    pickle.POP_MARK: 0,
    pickle.EMPTY_LIST: 0,
    pickle.APPEND: 0,
    pickle.APPENDS: 0,
    pickle.EMPTY_DICT: 0,
    pickle.SETITEM: 0,
    pickle.SETITEMS: 0,
    pickle.EMPTY_SET: 0,
    pickle.ADDITEMS: 0,
    pickle.FROZENSET: 0,
    pickle.STACK_GLOBAL: 0,
    pickle.REDUCE: 0,
    pickle.NEWOBJ: 0,
    pickle.BUILD: 0,
}
_SIZES: list[int | None] = [_ARG_SIZES.get(bytes([code])) for code in range(256)]
_STOP, _FRAME = pickle.STOP[0], pickle.FRAME[0]


_RUN_MAX = 1024  # opcodes per regex match


def _run_pattern() -> re.Pattern[bytes]:
    """Runs of opcodes whose argument has a fixed size, plus LONG1 (ints) and short strings
    and bytes, skipped in one C-speed regex match: an MPyC object array of n ints or a list
    of n client ids is one match, not n steps of :func:`_scan`'s loop."""

    def counted(op: bytes, lengths: range) -> bytes:  # op, a 1-byte length, that many bytes
        by_length = [re.escape(bytes([n])) + b".{%d}" % n for n in lengths]
        return re.escape(op) + b"(?:" + b"|".join(by_length) + b")"

    bare = b"".join(re.escape(op) for op, n in _ARG_SIZES.items() if n == 0 and op != pickle.STOP)
    fixed = [re.escape(op) + b".{%d}" % n for op, n in _ARG_SIZES.items() if n > 0]
    fixed.remove(re.escape(pickle.FRAME) + b".{8}")  # _scan checks its length
    # LONG1 first, most common length first: MPyC sends 61-bit ints (8 bytes)
    branches = [counted(pickle.LONG1, range(8, -1, -1)), b"[" + bare + b"]", *fixed]
    branches += [
        counted(pickle.SHORT_BINUNICODE, range(64)),
        counted(pickle.SHORT_BINBYTES, range(64)),
    ]
    # bounded: the regex engine keeps state per repetition of an unbounded run (1 GB for 8 MB)
    return re.compile(b"(?:" + b"|".join(branches) + b"){1,%d}" % _RUN_MAX, re.DOTALL)


_RUN = _run_pattern()


def _scan(data: bytes) -> None:
    """Walk the opcodes of ``data`` (O(opcodes), payloads skipped): refuse any opcode outside
    :data:`_ARG_SIZES`, a length or frame beyond the data, a missing STOP, trailing bytes."""
    end, i, run, sizes = len(data), 0, _RUN.match, _SIZES
    while i < end:
        skipped = run(data, i)
        if skipped is not None:
            i = skipped.end()
            if i >= end:
                break
        code = data[i]
        size = sizes[code]
        if size is None:
            raise ForbiddenPickle(f"pickle opcode {bytes([code])!r} refused (not protocol 4)")
        i += 1
        if code == _STOP:
            if i != end:
                raise ForbiddenPickle("trailing bytes after the pickle")
            return
        if size < 0:
            count = int.from_bytes(data[i : i - size], "little")
            i -= size
            if count > end - i:
                raise ForbiddenPickle("pickle declares a length beyond the end of the data")
            i += count
        else:
            if code == _FRAME and int.from_bytes(data[i : i + 8], "little") > end - i - 8:
                raise ForbiddenPickle("pickle declares a frame beyond the end of the data")
            i += size
    raise ForbiddenPickle("truncated pickle (no STOP)")


# numpy ---------------------------------------------------------------------------------------

# numpy's own reconstructors, whatever module they live in (numpy._core from 2.0, numpy.core
# before): the functions ndarray and scalar pickles name.
_NP_RECONSTRUCT: Callable[..., Any] = cast(tuple[Any, ...], np.empty(0).__reduce__())[0]
_NP_SCALAR: Callable[..., Any] = cast(tuple[Any, ...], np.uint8(0).__reduce__())[0]

_NUMERIC_CHARS = "?bhilqBHILQefdgFDG"  # bool, signed, unsigned, float, complex (all widths)


def _dtype_table() -> dict[tuple[str, tuple[Any, ...]], np.dtype[Any]]:
    """(pickled type string, pickled state) -> the dtype it stands for, for every numeric
    dtype in either byte order and for ``object``: the only dtype pickles accepted."""
    table: dict[tuple[str, tuple[Any, ...]], np.dtype[Any]] = {}
    for char in _NUMERIC_CHARS + "O":
        # by the string it pickles as ("u8"), so that np.dtype("u8") is uint64, not ulonglong
        native = np.dtype(cast(tuple[Any, ...], np.dtype(char).__reduce__())[1][0])
        variants = [native]
        if native.byteorder != "|":
            variants = [native.newbyteorder("<"), native.newbyteorder(">")]
        for dt in variants:
            _, (code, _align, _copy), state = cast(tuple[Any, ...], dt.__reduce__())
            table[(code, state)] = dt
    return table


_DTYPES = _dtype_table()
_DTYPE_CODES = frozenset(code for code, _ in _DTYPES)
_NUMERIC_KINDS = "biufc"
_SCALAR_TYPES = frozenset(dt.type for dt in _DTYPES.values() if dt.kind in _NUMERIC_KINDS)


class _NdarrayToken:
    """What the global ``numpy.ndarray`` loads as: a marker for :func:`_reconstruct`, not the
    class, so a pickle cannot call ``ndarray(shape, ...)`` itself."""

    __slots__ = ()

    def __call__(self, *args: object) -> None:
        raise ForbiddenPickle("numpy.ndarray called directly (only _reconstruct may name it)")


_NDARRAY = _NdarrayToken()


class _DtypeStub:
    """A dtype being unpickled: ``dtype(code, False, True)`` then ``__setstate__(state)``."""

    __slots__ = ("code", "dtype")

    def __init__(self, code: str) -> None:
        self.code = code
        self.dtype: np.dtype[Any] | None = None

    def __setstate__(self, state: object) -> None:
        if self.dtype is not None:
            raise ForbiddenPickle("numpy dtype state set twice")
        if type(state) is not tuple or not all(type(v) in (int, str, type(None)) for v in state):
            raise ForbiddenPickle(f"numpy dtype {self.code!r}: malformed state")
        dt = _DTYPES.get((self.code, state))
        if dt is None:
            raise ForbiddenPickle(f"numpy dtype {self.code!r}: state {_short(state)} refused")
        self.dtype = dt

    def resolved(self) -> np.dtype[Any]:
        if self.dtype is None:
            raise ForbiddenPickle(f"numpy dtype {self.code!r} without its state")
        return self.dtype


def _dtype(*args: object) -> _DtypeStub:
    """``numpy.dtype`` as pickles call it: ``dtype(code, False, True)``, an allowed code."""
    if len(args) != 3 or args[1] is not False or args[2] is not True:
        raise ForbiddenPickle("numpy.dtype called with other arguments than numpy pickles")
    code = args[0]
    if type(code) is not str or code not in _DTYPE_CODES:
        raise ForbiddenPickle(f"numpy dtype {_short(code)} refused (numeric dtypes only)")
    return _DtypeStub(code)


def _as_dtype(obj: object) -> np.dtype[Any]:
    if type(obj) is not _DtypeStub:
        raise ForbiddenPickle(f"expected a numpy dtype, got {type(obj).__name__}")
    return obj.resolved()


class _ArrayStub:
    """An ndarray being unpickled: ``_reconstruct(ndarray, (0,), b'b')`` then
    ``__setstate__((1, shape, dtype, is_fortran, data))``, checked before numpy sees it."""

    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array: np.ndarray[Any, Any] | None = None

    def __setstate__(self, state: object) -> None:
        if self.array is not None:
            raise ForbiddenPickle("numpy array state set twice")
        if type(state) is not tuple or len(state) != 5:
            raise ForbiddenPickle("numpy array: malformed state")
        version, shape, dtype_stub, is_fortran, data = state
        if type(version) is not int or version != 1 or type(is_fortran) is not bool:
            raise ForbiddenPickle("numpy array: malformed state")
        if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
            raise ForbiddenPickle("numpy array: malformed shape")
        dt = _as_dtype(dtype_stub)
        size = math.prod(shape)
        if dt.kind == "O":
            if type(data) is not list or len(data) != size:
                raise ForbiddenPickle("numpy object array: elements do not match its shape")
        elif type(data) is not bytes or len(data) != size * dt.itemsize:
            raise ForbiddenPickle("numpy array: data does not match its shape and dtype")
        array = _NP_RECONSTRUCT(np.ndarray, (0,), b"b")
        array.__setstate__((1, shape, dt, is_fortran, data))
        self.array = array


def _reconstruct(*args: object) -> _ArrayStub:
    """``numpy.core.multiarray._reconstruct`` as ndarray pickles call it, and only so."""
    if (
        len(args) != 3
        or args[0] is not _NDARRAY
        or type(args[1]) is not tuple
        or len(args[1]) != 1
        or type(args[1][0]) is not int
        or args[1][0] != 0
        or type(args[2]) is not bytes
        or args[2] != b"b"
    ):
        raise ForbiddenPickle("numpy _reconstruct called with other arguments than numpy pickles")
    return _ArrayStub()


def _scalar(*args: object) -> Any:
    """``numpy.core.multiarray.scalar(dtype, data)`` for numeric dtypes only."""
    if len(args) != 2:
        raise ForbiddenPickle("numpy scalar called with other arguments than numpy pickles")
    dt = _as_dtype(args[0])
    data = args[1]
    if dt.kind not in _NUMERIC_KINDS:
        raise ForbiddenPickle(f"numpy scalar of dtype {dt.str!r} refused")
    if type(data) is not bytes or len(data) != dt.itemsize:
        raise ForbiddenPickle("numpy scalar: data does not match its dtype")
    return _NP_SCALAR(dt, data)


# gmpy2, builtins ------------------------------------------------------------------------------

_MPZ: type = type(gmpy2.mpz(0))


def _from_binary(*args: object) -> object:
    """``gmpy2.from_binary(data)``, which is how an ``mpz`` pickles; any other gmpy2 type
    (``mpq``, ``mpfr``, ...) is refused before it is parsed (its type is the first byte)."""
    if len(args) != 1 or type(args[0]) is not bytes or args[0][:1] != b"\x01":
        raise ForbiddenPickle("gmpy2.from_binary called with other arguments than mpz pickles")
    value = gmpy2.from_binary(args[0])
    if type(value) is not _MPZ:
        raise ForbiddenPickle(f"gmpy2 {type(value).__name__} refused (mpz only)")
    return value


def _bytearray(*args: object) -> bytearray:
    """``bytearray()`` or ``bytearray(data)``, as protocol 4 pickles one (never a size)."""
    if args == ():
        return bytearray()
    if len(args) != 1 or type(args[0]) is not bytes:
        raise ForbiddenPickle("bytearray called with other arguments than bytearray pickles")
    return bytearray(args[0])


# MPyC finite fields ---------------------------------------------------------------------------


def _finfields() -> Any:
    """``mpyc.finfields`` if MPyC is loaded (by :mod:`mpc_agg.mpc.runtime`); this module never
    imports MPyC itself."""
    module = sys.modules.get("mpyc.finfields")
    if module is None:
        raise ForbiddenPickle("MPyC field values refused: MPyC is not loaded")
    return module


def _create_gf(*args: object) -> Any:
    """``PrimeFieldElement.createGF(p, n, w)``, how an MPyC prime-field element pickles, for the
    fields :func:`mpyc.finfields.GF` makes for :data:`FIELD_MODULI` only."""
    if len(args) != 3 or not all(type(a) is int for a in args) or args[0] not in FIELD_MODULI:
        raise ForbiddenPickle("MPyC field element of a field outside FIELD_MODULI refused")
    finfields = _finfields()
    field = finfields.GF(args[0])
    if (field.nth, field.root) != args[1:]:
        raise ForbiddenPickle("MPyC field element with unexpected field parameters refused")
    return finfields.PrimeFieldElement.createGF(*args)


class _FrozenClass(type):
    """A class no pickle ``BUILD`` can change (it would ``setattr`` on the class itself)."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise ForbiddenPickle(f"cannot set {name} on {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise ForbiddenPickle(f"cannot delete {name} from {cls.__name__}")


class _FieldArrayStub(metaclass=_FrozenClass):
    """An MPyC field array being unpickled (``NEWOBJ`` then ``__setstate__``); the walk
    builds the real array once its ``value`` is checked. ``target`` is set per field."""

    __slots__ = ("value",)
    target: Any = None

    def __new__(cls, *args: object) -> _FieldArrayStub:
        if args or cls.target is None:
            raise ForbiddenPickle("MPyC field array built with other arguments than MPyC pickles")
        return super().__new__(cls)

    def __setstate__(self, state: object) -> None:
        if hasattr(self, "value"):
            raise ForbiddenPickle("MPyC field array state set twice")
        if (
            type(state) is not tuple
            or len(state) != 2
            or state[0] is not None
            or type(state[1]) is not dict
            or list(state[1]) != ["value"]
        ):
            raise ForbiddenPickle("MPyC field array: malformed state")
        self.value = state[1]["value"]


_FIELD_ARRAY_STUBS: dict[str, type[_FieldArrayStub]] = {}


def _field_array_stub(name: str) -> type[_FieldArrayStub] | None:
    """The stub class for the MPyC array type named ``name`` (``ArrayGF(p)``), if ``p`` is in
    :data:`FIELD_MODULI`; None for any other name."""
    if name in _FIELD_ARRAY_STUBS:
        return _FIELD_ARRAY_STUBS[name]
    for p in FIELD_MODULI:
        if name == f"ArrayGF({p})":
            target = _finfields().GF(p).array
            if target.__qualname__ != name:
                return None
            namespace = {"__slots__": (), "target": target}
            stub = cast(
                type[_FieldArrayStub],
                _FrozenClass(f"_FieldArrayStub_{p}", (_FieldArrayStub,), namespace),
            )
            _FIELD_ARRAY_STUBS[name] = stub
            return stub
    return None


# the allowlist --------------------------------------------------------------------------------


class _Global:
    """An allowlisted global as a pickle gets it: callable, and with no attribute that a
    ``BUILD`` on it could set (a plain function has a ``__dict__`` and ``__defaults__``)."""

    __slots__ = ()

    def __call__(self, *args: object) -> Any:
        raise NotImplementedError


def _global(fn: Callable[..., Any]) -> _Global:
    namespace = {"__slots__": (), "__call__": staticmethod(fn)}
    cls = type(f"_Global_{fn.__name__}", (_Global,), namespace)
    return cast(_Global, cls())


_DTYPE, _RECONSTRUCT, _SCALAR = _global(_dtype), _global(_reconstruct), _global(_scalar)
_FROM_BINARY = _global(_from_binary)

ALLOWLIST: Mapping[tuple[str, str], object] = types.MappingProxyType(
    {
        # bytearray under protocol 4 pickles as builtins.bytearray(data).
        ("builtins", "bytearray"): _global(_bytearray),
        # numpy arrays: _reconstruct(ndarray, (0,), b'b') then setstate with a dtype(...).
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DTYPE,
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy < 2 peers
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy >= 2
        # numpy scalars (np.uint64(5), np.float64(0.5), ...): scalar(dtype, data).
        ("numpy.core.multiarray", "scalar"): _SCALAR,
        ("numpy._core.multiarray", "scalar"): _SCALAR,
        # gmpy2.mpz pickles as from_binary(data) (module gmpy2.gmpy2 from gmpy2 2.2 on).
        ("gmpy2", "from_binary"): _FROM_BINARY,
        ("gmpy2.gmpy2", "from_binary"): _FROM_BINARY,
        # MPyC prime-field elements; their arrays are the per-field ArrayGF(p) classes,
        # handled by _field_array_stub.
        ("mpyc.finfields", "PrimeFieldElement.createGF"): _global(_create_gf),
    }
)
"""``(module, name)`` -> what that global loads as. Each entry is a wrapper that accepts only
the arguments the real pickles use, never the real callable; ``ArrayGF(p)`` in
``mpyc.finfields`` is the one dynamic entry (a checked stub class, for ``p`` in
:data:`FIELD_MODULI`)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str, /) -> Any:
        found: object = ALLOWLIST.get((module, name))
        if found is None and module == "mpyc.finfields":
            found = _field_array_stub(name)
        if found is None:
            raise ForbiddenPickle(f"refused global {module}.{name}: not on the allowlist")
        return found


# the walk -------------------------------------------------------------------------------------

_ATOMS: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, bytearray, _MPZ} | _SCALAR_TYPES
)
_ARRAY_ELEMENTS: frozenset[type] = frozenset({int, _MPZ})


class _Walk:
    """One pass over a loaded value: checks every object's type, swaps the stubs for the
    real numpy and MPyC arrays, refuses cycles and deep nesting. Each object is visited once
    (shared references included), so the cost is O(objects)."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[object, object]] = {}  # id -> (original, result)
        self.active: set[int] = set()

    def visit(self, obj: object, depth: int) -> object:
        kind = type(obj)
        if kind in _ATOMS:
            return obj
        key = id(obj)
        if key in self.done:
            return self.done[key][1]
        if key in self.active:
            raise ForbiddenPickle("cyclic structure refused")
        if depth >= MAX_DEPTH:
            raise ForbiddenPickle(f"nesting deeper than {MAX_DEPTH} refused")
        self.active.add(key)
        result = self._convert(obj, kind, depth + 1)
        self.active.discard(key)
        self.done[key] = (obj, result)
        return result

    def _items(self, items: Any, depth: int) -> list[object] | None:
        """The visited items, or None if they are all atoms (a C-speed check)."""
        if set(map(type, items)) <= _ATOMS:
            return None
        return [self.visit(x, depth) for x in items]

    def _convert(self, obj: Any, kind: type, depth: int) -> object:
        if kind is list:
            new = self._items(obj, depth)
            if new is not None:
                obj[:] = new
            return obj
        if kind is tuple:
            new = self._items(obj, depth)
            if new is None or all(a is b for a, b in zip(new, obj, strict=True)):
                return obj
            return tuple(new)
        if kind is dict:
            for k, v in list(obj.items()):
                if self.visit(k, depth) is not k:
                    raise ForbiddenPickle("dict key of a refused kind")
                w = self.visit(v, depth)
                if w is not v:
                    obj[k] = w
            return obj
        if kind is set or kind is frozenset:
            new = self._items(obj, depth)
            if new is not None and not all(a is b for a, b in zip(new, obj, strict=True)):
                raise ForbiddenPickle("set element of a refused kind")
            return obj
        if kind is _ArrayStub:
            if obj.array is None:
                raise ForbiddenPickle("numpy array without its state")
            return _checked_array(obj.array)
        if isinstance(obj, _FieldArrayStub):
            if not hasattr(obj, "value"):
                raise ForbiddenPickle("MPyC field array without its value")
            value = self.visit(obj.value, depth)
            if type(value) is not np.ndarray or value.dtype.kind not in "Oiu":
                raise ForbiddenPickle("MPyC field array whose value is not an integer array")
            array = obj.target.__new__(obj.target)
            array.value = value
            return array
        finfields = sys.modules.get("mpyc.finfields")
        if finfields is not None and isinstance(obj, finfields.PrimeFieldElement):
            modulus = getattr(kind, "modulus", None)
            element: Any = getattr(obj, "value", None)
            if modulus not in FIELD_MODULI or type(element) not in _ARRAY_ELEMENTS:
                raise ForbiddenPickle("MPyC field element refused")
            if not 0 <= element < modulus:
                raise ForbiddenPickle("MPyC field element out of range")
            return obj
        raise ForbiddenPickle(f"value of type {kind.__module__}.{kind.__qualname__} refused")


def _checked_array(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    dt = array.dtype
    if dt.fields is not None or dt.subdtype is not None:
        raise ForbiddenPickle(f"numpy array of structured dtype {dt.str!r} refused")
    if dt.kind == "O":
        if not set(map(type, array.ravel().tolist())) <= _ARRAY_ELEMENTS:
            raise ForbiddenPickle("numpy object array holding other values than ints refused")
    elif dt.kind not in _NUMERIC_KINDS or dt.hasobject:
        raise ForbiddenPickle(f"numpy array of dtype {dt.str!r} refused")
    return array


# the entry points -----------------------------------------------------------------------------


def restricted_loads(data: bytes | bytearray | memoryview) -> object:
    """``pickle.loads`` for what peers send: the allowlisted kinds only (module docstring).

    Raises :class:`ForbiddenPickle` for anything refused, malformed, truncated or followed by
    trailing bytes."""
    raw = data if type(data) is bytes else bytes(data)
    size = len(raw)
    stream = io.BytesIO(raw)
    try:
        _scan(raw)
        loaded = _RestrictedUnpickler(stream, fix_imports=False).load()
        if stream.tell() != size:
            raise ForbiddenPickle("trailing bytes after the pickle")
        return _Walk().visit(loaded, 0)
    except ForbiddenPickle:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load is one refusal
        detail = f"{type(exc).__name__}: {exc}"[:_MALFORMED_DETAIL]
        raise ForbiddenPickle(f"malformed pickle ({detail})") from exc


def dumps(obj: object) -> bytes:
    """``pickle.dumps`` at :data:`PROTOCOL`, what :func:`restricted_loads` reads."""
    return pickle.dumps(obj, protocol=PROTOCOL)


SAFE_PICKLE = types.SimpleNamespace(
    dumps=dumps,
    loads=restricted_loads,
    UnpicklingError=pickle.UnpicklingError,
    PicklingError=pickle.PicklingError,
)
"""Stands in for the ``pickle`` module in ``mpyc.runtime`` (which uses ``dumps`` and
``loads`` only; no other MPyC module unpickles)."""


def install(loads: Callable[[bytes], object] = restricted_loads) -> None:
    """Make MPyC unpickle peer messages with ``loads`` (default :func:`restricted_loads`;
    the party passes a wrapper of it that turns a refusal into a value). Idempotent.

    Call it right after :func:`mpc_agg.mpc.runtime.load_runtime` has imported
    ``mpyc.runtime`` and before any party link is up; it never imports MPyC itself and raises
    RuntimeError if ``mpyc.runtime`` is not loaded yet."""
    runtime = sys.modules.get("mpyc.runtime")
    if runtime is None:
        raise RuntimeError("import mpyc.runtime (load_runtime) before installing the unpickler")
    shim = (
        SAFE_PICKLE
        if loads is restricted_loads
        else types.SimpleNamespace(**{**vars(SAFE_PICKLE), "loads": loads})
    )
    runtime.pickle = shim  # type: ignore[attr-defined]
