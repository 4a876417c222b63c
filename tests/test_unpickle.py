"""The restricted unpickler for peer messages (mpc_agg.mpc.unpickle).

README, "Security model": a party never runs code because of what a peer sends. Round trips
of every kind the protocol and MPyC 0.11 send, refusals of everything else (each raising
ForbiddenPickle, a pickle.UnpicklingError), and the cost on 8 MB payloads.

Importing ``mpyc`` parses ``sys.argv``, configures logging and installs uvloop's event loop
policy, so everything that needs MPyC (its field values, :func:`install`, a real
``mpc.transfer`` and ``mpc.input`` through the shim) runs in one child interpreter.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gmpy2  # type: ignore[import-untyped]
import numpy as np
import pytest

import mpc_agg
from mpc_agg.mpc import unpickle
from mpc_agg.mpc.unpickle import (
    MAX_DEPTH,
    PROTOCOL,
    SAFE_PICKLE,
    ForbiddenPickle,
    restricted_loads,
)

P = 2**61 - 1
NP_RECONSTRUCT = np.empty(0).__reduce__()[0]
NP_SCALAR = np.uint8(0).__reduce__()[0]


class Forged:
    """Pickles as whatever ``__reduce__`` tuple it is given (how an attacker writes one)."""

    def __init__(self, *reduce: Any) -> None:
        self.reduce = reduce

    def __reduce__(self) -> Any:
        return self.reduce


class Custom:
    """A plain class of the sender's: not on the allowlist."""

    def __init__(self) -> None:
        self.x = 1


def refuse(data: object) -> str:
    """The message of the ForbiddenPickle that loading ``data`` (bytes, or an object to
    pickle) raises."""
    raw = data if isinstance(data, bytes) else pickle.dumps(data, protocol=PROTOCOL)
    with pytest.raises(ForbiddenPickle) as info:
        restricted_loads(raw)
    assert isinstance(info.value, pickle.UnpicklingError)
    return str(info.value)


def same(a: object, b: object) -> bool:
    """Deep equality that also compares types and numpy arrays (dtype, shape, values)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def stack_global(module: str, name: str) -> bytes:
    """The protocol 4 opcodes that push the global ``module.name``."""
    m, n = module.encode(), name.encode()
    return b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93"


def nested_lists(depth: int) -> bytes:
    """A pickle of ``depth`` nested lists, written as opcodes (pickle.dumps would recurse)."""
    return b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."


# round trips ---------------------------------------------------------------------------------

ALLOWED: list[tuple[str, object]] = [
    ("none", None),
    ("bools", (True, False)),
    ("ints", (0, -1, 2**61 - 1, -(2**200), 10**40)),
    ("float", 0.25),
    ("str", "héllo"),
    ("bytes_empty", b""),
    ("bytearray", bytearray(b"\x00\xff")),
    ("bytearray_empty", bytearray()),
    ("protocol_message", ("mpc_agg", 1, "view", "r1", 8, 2, ["a", "b"], None, {"d": 8})),
    ("nested", [(1, [2, (3, {"k": [b"v", None]})]), {"x": (1.5, "y")}]),
    ("set", {1, "a", (2, 3)}),
    ("frozenset", frozenset({b"a", 4})),
    ("uint64", np.arange(1000, dtype=np.uint64) * np.uint64(2**50)),
    ("int64", np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64)),
    ("float64", np.linspace(-1, 1, 7)),
    ("bool", np.array([True, False, True])),
    ("int8_2d", np.arange(12, dtype=np.int8).reshape(3, 4)),
    ("fortran", np.asfortranarray(np.arange(6, dtype=np.uint32).reshape(2, 3))),
    ("complex", np.array([1 + 2j, -3j], dtype=np.complex64)),
    ("zero_d", np.array(7, dtype=np.uint64)),
    ("empty", np.array([], dtype=np.uint64)),
    ("empty_2d", np.zeros((0, 5), dtype=np.float32)),
    ("object_ints", np.array([0, 5, P - 1, 2**100], dtype=object)),  # what MPyC arrays send
    ("object_empty", np.array([], dtype=object)),
    ("scalars", (np.uint64(7), np.int64(-7), np.float64(0.5), np.bool_(True), np.float16(1))),
    ("mpz", (gmpy2.mpz(0), gmpy2.mpz(-(10**30)), gmpy2.mpz(P))),
    ("shared_refs", (lambda a: (a, a, [a]))(np.arange(3))),
]


@pytest.mark.parametrize("value", [v for _, v in ALLOWED], ids=[k for k, _ in ALLOWED])
def test_round_trip(value: object) -> None:
    data = pickle.dumps(value, protocol=PROTOCOL)
    loaded = restricted_loads(data)
    assert same(loaded, pickle.loads(data))
    assert same(loaded, value)


def test_round_trip_8_mb_payloads() -> None:
    blob = os.urandom(8 << 20)
    assert restricted_loads(pickle.dumps(blob)) == blob
    array = np.frombuffer(os.urandom(8 << 20), dtype=np.uint64)
    loaded = restricted_loads(pickle.dumps(array))
    assert isinstance(loaded, np.ndarray) and loaded.dtype == np.uint64
    assert np.array_equal(loaded, array)
    assert loaded.flags.writeable  # as pickle.loads returns it: MPyC may work in place


def test_shared_references_stay_shared() -> None:
    inner = [1, 2]
    pair = restricted_loads(pickle.dumps((inner, inner)))
    assert isinstance(pair, tuple) and pair[0] is pair[1]


def test_bytes_like_input() -> None:
    data = pickle.dumps(("x", np.arange(3)))
    for raw in (bytearray(data), memoryview(data)):
        assert same(restricted_loads(raw), ("x", np.arange(3)))


def test_safe_pickle_stands_in_for_the_pickle_module() -> None:
    value = ("mpc_agg", 1, np.arange(4, dtype=np.uint64), None)
    data = SAFE_PICKLE.dumps(value)
    assert data[:2] == b"\x80\x04"  # protocol 4, whatever Python's default
    assert same(SAFE_PICKLE.loads(data), value)
    assert SAFE_PICKLE.UnpicklingError is pickle.UnpicklingError


# refusals ------------------------------------------------------------------------------------


def test_os_system_is_refused_and_never_runs(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    message = refuse(Forged(os.system, (f"touch {target}",)))
    assert "system" in message and "allowlist" in message
    assert not target.exists()


def test_open_for_writing_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "written"
    assert "io.open" in refuse(Forged(open, (str(target), "w")))
    assert not target.exists()


@pytest.mark.parametrize("name", ["eval", "exec", "getattr", "__import__", "compile", "setattr"])
def test_dangerous_builtins_are_refused(name: str) -> None:
    assert f"builtins.{name}" in refuse(Forged(getattr(builtins, name), ("1",)))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04" + stack_global("numpy", "dtype.__class__") + b".",  # no traversal
        b"\x80\x04" + stack_global("builtins", "list") + b".",  # harmless, but not needed
        b"\x80\x04" + stack_global("gmpy2.gmpy2", "mpz") + b".",
        b"\x80\x04" + stack_global("numpy._core.numeric", "_frombuffer") + b".",  # protocol 5
        b"\x80\x04" + stack_global("mpyc.finfields", "pGF") + b".",
        b"\x80\x04" + stack_global("mpyc.finfields", "ArrayGF(101)") + b".",
    ],
    ids=[
        "dotted_name",
        "builtins_list",
        "gmpy2_mpz",
        "frombuffer",
        "mpyc_pGF",
        "mpyc_other_array",
    ],
)
def test_globals_off_the_allowlist_are_refused(raw: bytes) -> None:
    assert "not on the allowlist" in refuse(raw)


@pytest.mark.parametrize(
    "state",
    [
        b"}\x8c\x01xK\x01s",  # {"x": 1}: into the object's __dict__
        b"N}\x8c\x0c__defaults__K\x01\x85s\x86",  # (None, {"__defaults__": (1,)}): setattr
        b"N}\x8c\x08__call__K\x01s\x86",
    ],
    ids=["dict_state", "defaults", "call"],
)
@pytest.mark.parametrize(
    "name", [("numpy", "dtype"), ("numpy", "ndarray"), ("gmpy2.gmpy2", "from_binary")]
)
def test_allowlisted_globals_cannot_be_changed_by_build(
    name: tuple[str, str], state: bytes
) -> None:
    # a BUILD on a plain function would set attributes on it for the rest of the process
    refuse(b"\x80\x04" + stack_global(*name) + state + b"b.")
    assert same(restricted_loads(pickle.dumps(np.arange(3))), np.arange(3))
    assert restricted_loads(pickle.dumps(gmpy2.mpz(3))) == 3


def test_custom_class_instance_is_refused() -> None:
    assert "Custom" in refuse(Custom())


def test_protocol_5_numpy_arrays_are_refused() -> None:
    # SAFE_PICKLE.dumps pins protocol 4; protocol 5 sends arrays as BYTEARRAY8 + _frombuffer.
    assert "not protocol 4" in refuse(pickle.dumps(np.arange(3), protocol=5))


@pytest.mark.parametrize(
    "raw",
    [
        b"cos\nsystem\n(S'true'\ntR.",  # protocol 0: GLOBAL, STRING
        b"(cos\nsystem\nS'true'\no.",  # OBJ
        b"\x80\x02cbuiltins\neval\nq\x00.",  # GLOBAL, BINPUT
        b"\x80\x04I1\n.",  # INT
        b"\x80\x04(l.",  # LIST
        b"\x80\x04]2.",  # DUP
        b"\x80\x04\x8c\x01a\x8c\x01b\x92.",  # NEWOBJ_EX
    ],
    ids=["global", "obj", "binput", "int", "list", "dup", "newobj_ex"],
)
def test_opcodes_protocol_4_never_emits_are_refused(raw: bytes) -> None:
    assert "not protocol 4" in refuse(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"]r\xff\xff\xff\x7f.",  # LONG_BINPUT 2**31 - 1: a 16 GB memo table (gh-115952)
        b"\x80\x04]p99999999999\n.",  # PUT
        b"\x80\x04]q\xff.",  # BINPUT
    ],
    ids=["long_binput", "put", "binput"],
)
def test_memo_growth_opcodes_are_refused_before_unpickling(raw: bytes) -> None:
    start = time.perf_counter()
    assert "not protocol 4" in refuse(raw)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"x.",  # BINBYTES8
        b"\x80\x04\x8d" + (2**40).to_bytes(8, "little") + b"x.",  # BINUNICODE8
        b"\x80\x04\x8b\xff\xff\xff\x7f\x00.",  # LONG4
        b"\x80\x04\x95" + (2**50).to_bytes(8, "little") + b"N.",  # FRAME
    ],
    ids=["binbytes8", "binunicode8", "long4", "frame"],
)
def test_lengths_beyond_the_data_are_refused_before_allocating(raw: bytes) -> None:
    assert "beyond the end" in refuse(raw)


@pytest.mark.parametrize(
    "array",
    [
        np.array([1, "x"], dtype=object),
        np.array([1.5], dtype=object),
        np.array([True], dtype=object),
        np.array([None], dtype=object),
        np.zeros(2, dtype=[("a", "<u8"), ("b", "<f8")]),
        np.zeros(2, dtype=[("a", "O")]),
        np.array(["a", "b"]),
        np.array([b"a"]),
        np.zeros(2, dtype="V8"),
        np.zeros(2, dtype="datetime64[s]"),
        np.zeros(2, dtype="timedelta64[s]"),
    ],
    ids=[
        "object_str",
        "object_float",
        "object_bool",
        "object_none",
        "structured",
        "structured_object",
        "unicode",
        "bytes",
        "void",
        "datetime",
        "timedelta",
    ],
)
def test_non_numeric_arrays_are_refused(array: np.ndarray) -> None:
    refuse(array)


def test_object_scalar_and_void_scalar_are_refused() -> None:
    refuse(np.zeros(1, dtype=[("a", "<u8")])[0])
    refuse(np.str_("x"))
    refuse(np.datetime64(1, "s"))


def dtype_forged(code: str, state: tuple[Any, ...], align: Any = False, copy: Any = True) -> Forged:
    return Forged(np.dtype, (code, align, copy), state)


def array_forged(dtype: object, shape: tuple[int, ...], data: object) -> Forged:
    return Forged(NP_RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))


def test_forged_dtype_states_are_refused() -> None:
    pointers = (0x4141414141414141).to_bytes(8, "little") * 2
    # numpy accepts these states on a dtype copy (object flags, fields on a plain uint64),
    # which would make the raw bytes object pointers.
    for state in [
        (3, "<", None, None, None, -1, -1, 63),
        (3, "<", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 63),
        (3, "<", None, None, None, 16, 1, 0),
        (3, "|", None, None, None, -1, -1, 0),
    ]:
        message = refuse(array_forged(dtype_forged("u8", state), (2,), pointers))
        assert "dtype" in message
    # the builtin singleton (copy=False), whose setstate would change it process-wide
    refuse(dtype_forged("u8", (3, ">", None, None, None, -1, -1, 0), copy=False))
    # a dtype string numpy parses into something else than a numeric type
    for code in ["u8,u8", "(2,)u8", "M8[s]", "U1", "V8", "O"]:
        refuse(array_forged(dtype_forged(code, (3, "<", None, None, None, -1, -1, 0)), (1,), b""))


def test_forged_arrays_are_refused_before_numpy_allocates() -> None:
    u8 = np.dtype("u8")
    refuse(Forged(np.ndarray, ((10**12,),)))  # ndarray(shape) itself
    refuse(Forged(NP_RECONSTRUCT, (np.ndarray, (10**12,), b"b")))  # huge placeholder
    refuse(array_forged(u8, (10**12,), b"\x00" * 8))  # data shorter than the shape
    refuse(array_forged(u8, (-1,), b""))
    refuse(array_forged(u8, (1,), "12345678"))
    refuse(array_forged(np.dtype("O"), (2,), b"\x00" * 16))  # object array from raw bytes
    refuse(array_forged(np.dtype("O"), (3,), [1, 2]))
    refuse(array_forged("u8", (1,), b"\x00" * 8))  # dtype as a string


def test_forged_scalars_and_gmpy2_values_are_refused() -> None:
    refuse(Forged(NP_SCALAR, (np.dtype("O"), "x")))
    refuse(Forged(NP_SCALAR, (np.dtype("u8"), b"\x00")))  # wrong length
    for value in [gmpy2.mpq(1, 3), gmpy2.mpfr(1.5), gmpy2.xmpz(3)]:
        assert "mpz" in refuse(value)


def test_bytearray_of_a_size_is_refused() -> None:
    refuse(Forged(bytearray, (10**12,)))


def test_deep_nesting_is_refused_without_crashing() -> None:
    assert "nesting" in refuse(nested_lists(100_000))
    assert "nesting" in refuse(nested_lists(MAX_DEPTH + 1))
    loaded = restricted_loads(nested_lists(MAX_DEPTH))
    for _ in range(MAX_DEPTH - 1):
        assert isinstance(loaded, list) and len(loaded) == 1
        loaded = loaded[0]
    assert loaded == []


def test_exponential_sharing_is_walked_once() -> None:
    value: tuple[Any, ...] = ()
    for _ in range(60):  # 2**60 paths through 60 distinct tuples
        value = (value, value)
    start = time.perf_counter()
    loaded = restricted_loads(pickle.dumps(value))
    assert time.perf_counter() - start < 1.0
    assert isinstance(loaded, tuple) and loaded[0] is loaded[1]


def test_cycles_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert "cyclic" in refuse(loop)
    table: dict[str, Any] = {}
    table["self"] = (table,)
    assert "cyclic" in refuse(table)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        pickle.dumps(("a", np.arange(10)))[:-5],  # truncated
        pickle.dumps(b"x" * 1000)[:100],  # truncated inside a bytes
        pickle.dumps((1, 2)) + b"\x00",  # trailing bytes
        b"\x80\x04P\x00.",  # persistent id
        b"\x80\x04\x82\x01.",  # extension code
        b"\x80\x05\x97.",  # out-of-band buffer
        b"\x80\x04a.",  # APPEND on an empty stack
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "truncated_bytes",
        "trailing",
        "persid",
        "ext1",
        "next_buffer",
        "stack_underflow",
    ],
)
def test_malformed_pickles_raise_one_catchable_type(raw: bytes) -> None:
    refuse(raw)


def test_mpyc_values_are_refused_while_mpyc_is_not_loaded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "mpyc.finfields", raising=False)
    create_gf = stack_global("mpyc.finfields", "PrimeFieldElement.createGF")
    args = pickle.dumps((P, 2, P - 1), protocol=PROTOCOL)[2:-1]
    assert "not loaded" in refuse(b"\x80\x04" + create_gf + args + b"R.")
    array = stack_global("mpyc.finfields", f"ArrayGF({P})")
    assert "not loaded" in refuse(b"\x80\x04" + array + b".")


def test_install_needs_mpyc_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "mpyc.runtime", raising=False)
    with pytest.raises(RuntimeError, match="mpyc.runtime"):
        unpickle.install()


def best_of(fn: Callable[[], object], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("kind", ["bytes", "uint64"])
def test_overhead_on_8_mb_is_negligible(kind: str) -> None:
    raw = os.urandom(8 << 20)
    payload = raw if kind == "bytes" else np.frombuffer(raw, dtype=np.uint64)
    data = pickle.dumps(payload, protocol=PROTOCOL)
    plain = best_of(lambda: pickle.loads(data))
    restricted = best_of(lambda: restricted_loads(data))
    # the walk is O(objects): no pass over the 8 MB
    assert restricted < 2 * plain + 0.005, (plain, restricted)


# MPyC, in a child interpreter ----------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment for a child that imports the same mpc_agg as these tests."""
    env = dict(os.environ)
    root = str(Path(mpc_agg.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_importing_the_module_leaves_mpyc_out(tmp_path: Path) -> None:
    code = "import sys, mpc_agg.mpc.unpickle; print(any(m.startswith('mpyc') for m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


CHILD = r"""
import json, os, pickle, sys
target = sys.argv[1]
sys.argv = ["unpickle-child", "--no-log"]
from mpyc.runtime import mpc
import mpyc.runtime
import numpy as np
from mpyc import finfields, thresha
from mpc_agg.mpc import unpickle
from mpc_agg.mpc.unpickle import ForbiddenPickle, restricted_loads

P = 2**61 - 1
F = finfields.GF(P)
out = {}

class Forged:
    def __init__(self, *reduce):
        self.reduce = reduce
    def __reduce__(self):
        return self.reduce

def load(value):
    try:
        return restricted_loads(pickle.dumps(value)), None
    except ForbiddenPickle as exc:
        return None, str(exc)

def refused(value):
    return load(value)[1]

element, error = load(F(5))
out["element"] = error or [type(element) is F, int(element), load(F(P - 1))[0] == F(P - 1)]
array, error = load(F.array(np.arange(5)))
out["array"] = error or [type(array) is F.array, array.value.dtype.str, array.value.tolist()]
row = thresha.np_random_split(F, F.array(np.arange(5)), 1, 3)[1]
loaded, error = load(row)
out["split_row"] = error or [loaded.dtype.str, loaded.tolist() == row.tolist()]

create = finfields.PrimeFieldElement.createGF
bad_array = F.array(np.arange(2))
bad_array.value = np.array(["a", 1], dtype=object)
out["refused"] = {
    "other_modulus": refused(finfields.GF(101)(5)),
    "other_array_field": refused(finfields.GF(101).array(np.arange(2))),
    "extension_field": refused(finfields.GF(finfields.find_irreducible(2, 8))(3)),
    "other_root": refused(Forged(create, (P, 2, 3), (None, {"value": 5}))),
    "out_of_range": refused(Forged(create, (P, 2, P - 1), (None, {"value": P + 3}))),
    "str_value": refused(Forged(create, (P, 2, P - 1), (None, {"value": "5"}))),
    "array_of_str": refused(bad_array),
}

# a BUILD on the stub class that stands for ArrayGF(p) must not change it for later loads
name = ("ArrayGF(%d)" % P).encode()
stub_build = (
    b"\x80\x04\x8c\x0empyc.finfields\x8c" + bytes([len(name)]) + name + b"\x93"
    + b"N}\x8c\x06targetNs\x86b."
)
try:
    restricted_loads(stub_build)
    out["stub_build"] = None
except ForbiddenPickle as exc:
    out["stub_build"] = str(exc)
out["array_after_stub_build"] = type(load(F.array(np.arange(2)))[0]) is F.array

out["before_install"] = mpyc.runtime.pickle is pickle
unpickle.install()
unpickle.install()
out["installed"] = mpyc.runtime.pickle is unpickle.SAFE_PICKLE
try:
    mpyc.runtime.pickle.loads(pickle.dumps(Forged(os.system, ("touch " + target,))))
    out["evil"] = None
except pickle.UnpicklingError as exc:
    out["evil"] = [type(exc).__name__, str(exc)]
out["evil_ran"] = os.path.exists(target)

seen = []
real = unpickle.SAFE_PICKLE.loads
def spy(data):
    value = real(data)
    seen.append(value.dtype.str if isinstance(value, np.ndarray) else type(value).__name__)
    return value
unpickle.SAFE_PICKLE.loads = spy

async def main():
    await mpc.start()
    got = await mpc.transfer(("mpc_agg", 1, b"x", np.arange(3, dtype=np.uint64)))
    secfld = mpc.SecFld(order=P)
    x = mpc.input(secfld.array(np.arange(5)), senders=0)
    opened = await mpc.output(x + x)
    await mpc.shutdown()
    return got, opened

got, opened = mpc.run(main())
out["transfer"] = [got[0][:3] == ("mpc_agg", 1, b"x"), got[0][3].tolist()]
out["opened"] = [int(v) for v in opened]
out["seen"] = seen
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run CHILD once with the same mpc_agg as these tests; its JSON report."""
    tmp = tmp_path_factory.mktemp("unpickle_child")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp / "pwned")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_mpyc_field_values_round_trip(child: dict[str, Any]) -> None:
    assert child["element"] == [True, 5, True]
    assert child["array"] == [True, "|O", [0, 1, 2, 3, 4]]
    assert child["split_row"] == ["|O", True]  # the rows MPyC's secure arrays send


def test_mpyc_values_beyond_the_engine_field_are_refused(child: dict[str, Any]) -> None:
    refused = child["refused"]
    assert all(refused.values()), refused
    assert "not on the allowlist" in refused["other_array_field"]
    assert "ExtensionFieldElement.createGF" in refused["extension_field"]


def test_field_array_stub_class_cannot_be_changed_by_build(child: dict[str, Any]) -> None:
    assert child["stub_build"]
    assert child["array_after_stub_build"] is True


def test_install_makes_mpyc_refuse_a_malicious_payload(child: dict[str, Any]) -> None:
    assert child["before_install"] and child["installed"]
    assert child["evil"][0] == "ForbiddenPickle" and "system" in child["evil"][1]
    assert child["evil_ran"] is False


def test_mpyc_still_works_through_the_shim(child: dict[str, Any]) -> None:
    assert child["transfer"] == [True, [0, 1, 2]]
    assert child["opened"] == [0, 2, 4, 6, 8]
    # transfer unpickles a tuple; mpc.input of a secure array unpickles an object array
    assert "tuple" in child["seen"] and "|O" in child["seen"]
