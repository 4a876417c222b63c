"""Model helpers and FedAvg math: flatten/unflatten round trips (property tests), typed
errors, the weighted-average scheme, and importing the integrations without flwr or torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mpc_agg import EncodingError, Topology
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.errors import LayoutError, UsageError
from mpc_agg.integrations import (
    FedAvgScheme,
    ModelLayout,
    aggregate_updates,
    flatten,
    open_fedavg_round,
    submit_update,
    unflatten,
    weighted_mean,
)
from mpc_agg.integrations.model import EXACT_INT

from .conftest import topology_doc

# --------------------------------------------------------------------------- strategies

FLOATS = [np.float16, np.float32, np.float64]
INTS = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def entry(draw: st.DrawFn) -> np.ndarray:
    """One array: any float or integer dtype, any shape (0-d and empty included)."""
    dtype = np.dtype(draw(st.sampled_from(FLOATS + INTS)))
    shape = draw(SHAPES)
    if dtype.kind == "f":
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(int(info.min), -EXACT_INT), min(int(info.max), EXACT_INT))
    return draw(hnp.arrays(dtype, shape, elements=elements))


NAMES = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=8)


@st.composite
def params(draw: st.DrawFn) -> object:
    """A list, tuple, dict (keys in drawn order), OrderedDict or single array."""
    kind = draw(st.sampled_from(["list", "tuple", "dict", "ordereddict", "array"]))
    if kind == "array":
        return draw(entry())
    if kind in ("list", "tuple"):
        values = draw(st.lists(entry(), max_size=5))
        return values if kind == "list" else tuple(values)
    names = draw(st.lists(NAMES, max_size=5, unique=True))
    pairs = [(n, draw(entry())) for n in names]
    return dict(pairs) if kind == "dict" else OrderedDict(pairs)


def items(p: object) -> list[tuple[str, np.ndarray]]:
    if isinstance(p, dict):
        return list(p.items())
    if isinstance(p, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(p)]
    return [("0", p)]


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and values (NaN equal to NaN, and -0.0 distinct from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))
    return np.array_equal(a, b)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=300, deadline=None)
@given(params())
def test_flatten_unflatten_round_trip_is_exact(p: object) -> None:
    vector, layout = flatten(p)
    assert vector.dtype == np.float64 and vector.ndim == 1
    assert vector.shape[0] == layout.size == sum(np.asarray(v).size for _, v in items(p))
    back = layout.unflatten(vector)
    assert type(back) is (np.ndarray if isinstance(p, np.ndarray) else type(p))
    got, want = items(back), items(p)
    assert [n for n, _ in got] == [n for n, _ in want]  # names, in order
    for (_, b), (_, a) in zip(got, want, strict=True):
        assert same_array(b, a), (a, b)
    again = items(unflatten(vector, layout))  # the function form does the same
    assert all(same_array(b, a) for (_, b), (_, a) in zip(again, got, strict=True))


@settings(max_examples=200, deadline=None)
@given(params())
def test_vector_is_the_entries_in_container_order(p: object) -> None:
    """The flat vector is each entry's values in C order, entries in container order (the
    order clients and server must agree on)."""
    vector, layout = flatten(p)
    parts = [np.asarray(v).reshape(-1).astype(np.float64) for _, v in items(p)]
    expected = np.concatenate(parts) if parts else np.zeros(0)
    assert np.array_equal(vector, expected, equal_nan=True)
    for spec, (name, value) in zip(layout.entries, items(p), strict=True):
        assert spec.name == name and spec.shape == np.asarray(value).shape
        seg = vector[spec.offset : spec.offset + spec.size]
        assert np.array_equal(seg, np.asarray(value).reshape(-1).astype(float), equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(NAMES, min_size=2, max_size=6, unique=True), st.integers(1, 5))
def test_dict_order_is_kept_and_matters(names: list[str], shift: int) -> None:
    d = {n: np.array([float(i)]) for i, n in enumerate(names)}
    vector, layout = flatten(d)
    assert list(layout.unflatten(vector)) == names
    assert list(vector) == [float(i) for i in range(len(names))]
    shift = shift % len(names) or 1
    shuffled = names[shift:] + names[:shift]  # a rotation: differs from names
    other = {n: d[n] for n in shuffled}
    with pytest.raises(LayoutError, match="name"):
        layout.flatten(other)  # same entries, other order: not the same layout


def test_aggregate_vector_unflattens_to_the_mean_model() -> None:
    """What FedAvg does: the mean of flat vectors unflattens to the entrywise mean."""
    rng = np.random.default_rng(0)
    models = [
        {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2)} for _ in range(4)
    ]
    vectors = [flatten(m)[0] for m in models]
    layout = flatten(models[0])[1]
    mean = layout.unflatten(np.mean(vectors, axis=0))
    assert mean["w"].dtype == np.float32 and mean["b"].dtype == np.float64
    np.testing.assert_allclose(mean["w"], np.mean([m["w"] for m in models], axis=0), rtol=1e-6)
    np.testing.assert_allclose(mean["b"], np.mean([m["b"] for m in models], axis=0))


def test_scalars_and_array_likes() -> None:
    vector, layout = flatten([1.5, 2, np.float32(3.0), [[1, 2], [3, 4]]])
    assert list(vector) == [1.5, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0]
    back = layout.unflatten(vector)
    assert [b.dtype for b in back] == [np.float64, np.int64, np.float32, np.int64]
    assert back[3].shape == (2, 2)
    assert flatten([])[0].shape == (0,) and flatten({})[1].unflatten([]) == {}


def test_integer_entries_round_and_clip() -> None:
    _, layout = flatten({"u": np.zeros(4, np.uint8), "i": np.zeros(2, np.int64)})
    out = layout.unflatten([300.4, -3.0, 2.5, 3.5, -7.6, 1e300])
    assert out["u"].tolist() == [255, 0, 2, 4]  # clipped to uint8; halves to even
    assert out["i"].tolist() == [-8, EXACT_INT]
    with pytest.raises(LayoutError, match="'i'.*non-finite"):
        layout.unflatten([0, 0, 0, 0, 0, np.nan])


def test_float16_overflow_becomes_inf_like_a_cast() -> None:
    _, layout = flatten([np.zeros(2, np.float16)])
    assert layout.unflatten([1e6, -1e6])[0].tolist() == [np.inf, -np.inf]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (np.array([True, False]), "dtype bool"),
        (np.array([1 + 2j]), "dtype complex128"),
        (np.array(["a"]), "dtype <U1"),
        (np.array([object()]), "dtype object"),
        (np.array(["2024-01-01"], dtype="datetime64[D]"), "dtype datetime64"),
        (np.array([2**53 + 1], dtype=np.int64), "beyond 2**53"),
        (np.array([2**63], dtype=np.uint64), "beyond 2**53"),
        ({"nested": np.zeros(2)}, "nested containers"),
        ("text", "entries must be arrays"),
    ],
)
def test_unsupported_entries_are_refused_by_name(value: object, words: str) -> None:
    with pytest.raises(LayoutError) as err:
        flatten({"ok": np.zeros(2), "bad": value})
    assert "'bad'" in str(err.value) and words in str(err.value)


def test_float_wider_than_64_bits_is_refused() -> None:
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(LayoutError, match="wider than float64"):
        flatten([np.zeros(2, np.longdouble)])


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({1: np.zeros(2)}, "keys must be strings"),
        ("abc", "got str"),
        (object(), "got object"),
        ((x for x in [np.zeros(1)]), "got generator"),
    ],
)
def test_unsupported_containers_are_refused(params: object, words: str) -> None:
    with pytest.raises(LayoutError, match=words):
        flatten(params)


def test_unflatten_checks_length_shape_and_dtype() -> None:
    _, layout = flatten({"a": np.zeros((2, 3)), "b": np.zeros(1)})
    with pytest.raises(LayoutError, match="length 6, but the layout needs 7"):
        layout.unflatten(np.zeros(6))
    with pytest.raises(LayoutError, match="length 8"):
        layout.unflatten(np.zeros(8))
    with pytest.raises(LayoutError, match="1-dimensional"):
        layout.unflatten(np.zeros((7, 1)))
    with pytest.raises(LayoutError, match="numeric"):
        layout.unflatten(np.array(["x"] * 7))


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ({"a": np.zeros((3, 2)), "b": np.zeros(1)}, "entry 'a': shape (3, 2) instead of (2, 3)"),
        ({"a": np.zeros((2, 3), np.float32), "b": np.zeros(1)}, "dtype 'float32'"),
        ({"a": np.zeros((2, 3)), "c": np.zeros(1)}, "name 'c' instead of 'b'"),
        ({"a": np.zeros((2, 3))}, "1 entries instead of 2"),
        ([np.zeros((2, 3)), np.zeros(1)], "container 'list' instead of 'dict'"),
    ],
)
def test_layout_flatten_names_the_first_difference(other: object, words: str) -> None:
    _, layout = flatten({"a": np.zeros((2, 3)), "b": np.zeros(1)})
    with pytest.raises(LayoutError) as err:
        layout.flatten(other)
    assert words in str(err.value)
    assert np.array_equal(layout.flatten({"a": np.ones((2, 3)), "b": [2.0]}), [1] * 6 + [2])


def test_layout_flatten_can_ignore_dtypes() -> None:
    _, layout = flatten({"a": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.int64)})
    other = {"a": np.ones((2, 3)), "b": np.array([2.5])}
    assert list(layout.flatten(other, dtypes=False)) == [1.0] * 6 + [2.5]
    with pytest.raises(LayoutError, match="dtype"):
        layout.flatten(other)
    with pytest.raises(LayoutError, match="shape"):
        layout.flatten({"a": np.ones((3, 2)), "b": np.array([2.5])}, dtypes=False)


def test_layout_error_is_an_encoding_error_and_a_value_error() -> None:
    assert issubclass(LayoutError, EncodingError) and issubclass(LayoutError, ValueError)
    assert isinstance(flatten([np.zeros(1)])[1], ModelLayout)


# --------------------------------------------------------------------------- torch


def test_torch_state_dict_round_trip() -> None:
    torch = pytest.importorskip("torch")
    sd = OrderedDict(
        weight=torch.randn(3, 2),
        half=torch.randn(4).to(torch.bfloat16),
        steps=torch.tensor(7, dtype=torch.int64),
        empty=torch.zeros(0, 5, dtype=torch.float16),
    )
    vector, layout = flatten(sd)
    assert layout.size == 6 + 4 + 1 + 0 and layout.container == "ordereddict"
    back = layout.unflatten(vector)
    assert list(back) == list(sd)
    for k in sd:
        assert isinstance(back[k], torch.Tensor)
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
        assert torch.equal(back[k], sd[k])


# --------------------------------------------------------------------------- FedAvg math


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, (n, 5), elements=st.floats(-10, 10)),
            st.lists(st.integers(0, 500), min_size=n, max_size=n).filter(lambda w: sum(w) > 0),
        )
    ),
    st.sampled_from([1.0, 7.0, 1000.0]),
)
def test_weighted_scheme_sum_divides_to_the_weighted_mean(data, weight_scale: float) -> None:
    """Summing the clients' [w'x, w'] and dividing (what the aggregators and the server do)
    is the plaintext weighted mean, whatever the public weight_scale."""
    xs, ws = data
    scheme = FedAvgScheme("examples", weight_scale)
    contributions = [scheme.contribution(x, w) for x, w in zip(xs, ws, strict=True)]
    assert all(c.shape == (scheme.submitted_dim(5),) == (6,) for c in contributions)
    mean, total_weight = scheme.average(np.sum(contributions, axis=0), len(xs))
    np.testing.assert_allclose(mean, weighted_mean(xs, ws), rtol=1e-9, atol=1e-9)
    assert total_weight == pytest.approx(sum(ws))


def test_uniform_scheme_divides_by_the_number_of_clients() -> None:
    xs = np.arange(12.0).reshape(3, 4)
    scheme = FedAvgScheme("uniform")
    contributions = [scheme.contribution(x, weight=99) for x in xs]  # weight is ignored
    assert scheme.submitted_dim(4) == 4
    mean, total_weight = scheme.average(np.sum(contributions, axis=0), 3)
    np.testing.assert_allclose(mean, xs.mean(axis=0))
    assert total_weight == 3.0


def test_weighted_contribution_that_would_be_clipped_is_refused() -> None:
    enc = FixedPointEncoding(frac_bits=16, coord_clip=100.0)
    scheme = FedAvgScheme("examples")
    scheme.contribution(np.full(3, 2.0), 50, enc)  # 2 x 50 = coord_clip: not clipped
    with pytest.raises(EncodingError, match="102 > coord_clip 100.*raise weight_scale"):
        scheme.contribution(np.full(3, 2.0), 51, enc)
    with pytest.raises(EncodingError, match="101 > coord_clip 100"):  # the weight itself
        scheme.contribution(np.full(3, 0.5), 101, enc)
    FedAvgScheme("examples", weight_scale=1000).contribution(np.full(3, 2.0), 51, enc)
    with pytest.raises(EncodingError, match="l2_clip 10"):
        scheme.contribution(np.full(4, 6.0), 1.0, FixedPointEncoding(16, None, 10.0))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: FedAvgScheme("median"), "weighting"),
        (lambda: FedAvgScheme("examples", 0.0), "weight_scale"),
        (lambda: FedAvgScheme("examples", float("inf")), "weight_scale"),
        (lambda: FedAvgScheme().average(np.array([1.0, 0.0]), 2), "summed weight"),
        (lambda: FedAvgScheme("uniform").average(np.zeros(2), 0), "0 clients"),
        (lambda: weighted_mean([[1.0], [2.0]], [0, 0]), "sum to 0"),
        (lambda: weighted_mean([[1.0], [2.0]], [1]), "one finite weight"),
    ],
)
def test_scheme_misuse_is_a_usage_error(call, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        call()


@pytest.mark.parametrize(
    ("update", "weight", "words"),
    [
        (np.zeros((2, 2)), 1.0, "1-dimensional"),
        (np.array([0.0, np.nan]), 1.0, "non-finite value nan at index 1"),
        (np.zeros(2), -1.0, "weight must be"),
        (np.zeros(2), float("nan"), "weight must be"),
        (np.zeros(2), True, "weight must be"),
    ],
)
def test_bad_updates_and_weights_are_encoding_errors(update, weight, words: str) -> None:
    with pytest.raises(EncodingError, match=words):
        FedAvgScheme().contribution(update, weight)


def test_scheme_for_topology_picks_uniform_under_dp_and_refuses_examples() -> None:
    plain = Topology.from_dict(topology_doc(3, 1))
    dp = Topology.from_dict(
        topology_doc(
            3,
            1,
            encoding={"frac_bits": 16, "coord_clip": None},
            dp={
                "mechanism": "discrete_gaussian",
                "epsilon": 1.0,
                "delta": 1e-5,
                "l2_clip": 1.0,
                "budget": {"epsilon": 8.0, "delta": 1e-4},
            },
        )
    )
    assert FedAvgScheme.for_topology(plain) == FedAvgScheme("examples", 1.0)
    assert FedAvgScheme.for_topology(plain, "uniform").weighting == "uniform"
    assert FedAvgScheme.for_topology(dp) == FedAvgScheme("uniform", 1.0)
    with pytest.raises(UsageError, match="noisy denominator"):
        FedAvgScheme.for_topology(dp, "examples")


@pytest.mark.processes
def test_weighted_fedavg_round_on_real_parties(federation3, round_id: str) -> None:
    """The backend path without any framework: open, submit [w'x, w'], aggregate, divide."""
    topology = federation3.topology
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(4, 50))
    ws = [10, 25, 40, 5]
    scheme = FedAvgScheme.for_topology(topology, weight_scale=50)
    collector = federation3.collector()
    open_fedavg_round(collector, round_id, 50, scheme)
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        submit_update(federation3.client(f"c{i}"), round_id, x, w, scheme=scheme)
    out = aggregate_updates(collector, round_id, scheme=scheme, timeout=60)
    # Each client's w' = w / 50 is exact to 2^-24 (randomized rounding): 4 x 2^-24 x 50.
    assert out.num_clients == 4 and out.total_weight == pytest.approx(80, abs=4 * 2**-24 * 50)
    np.testing.assert_allclose(out.mean, weighted_mean(xs, ws), atol=1e-6)
    assert out.epsilon is None and out.noise_stddev is None


# --------------------------------------------------------------------------- imports

CHILD = r"""
import json, sys
import mpc_agg.integrations as integ
before = {m: m in sys.modules for m in ("flwr", "torch")}
integ.flatten([1.0]); integ.FedAvgScheme()
after_use = {m: m in sys.modules for m in ("flwr", "torch")}
try:
    integ.MpcFedAvg
    flower = "flwr" in sys.modules
except ImportError:
    flower = None
print(json.dumps({"before": before, "after_use": after_use, "flower": flower}))
"""


@pytest.fixture(scope="module", autouse=True)
def import_child(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen | None]:
    """The fresh interpreter of the import test below, started with the module's first test
    so that it runs beside the property tests (``None`` when that test is not selected)."""
    name = "test_importing_integrations_imports_neither_flwr_nor_torch"
    if not any(
        getattr(item, "module", None) is request.module and item.name == name
        for item in request.session.items
    ):
        yield None
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path_factory.mktemp("imports"),
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_importing_integrations_imports_neither_flwr_nor_torch(
    import_child: subprocess.Popen,
) -> None:
    stdout, stderr = import_child.communicate(timeout=120)
    assert import_child.returncode == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["before"] == {"flwr": False, "torch": False}
    assert out["after_use"] == {"flwr": False, "torch": False}
    # The Flower names load flwr on first use (when it is installed).
    assert out["flower"] in (True, None)
