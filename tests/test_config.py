"""Topology loading: every shipped config loads; every bad input is a ConfigError naming
the YAML path and value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mpc_agg import ConfigError, Topology
from mpc_agg.core.field import HALF
from mpc_agg.mpc.argv import mpyc_argv

from .conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_directory_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"local-3.yaml", "local-2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    topo = Topology.load(path)
    assert topo.m >= 2
    assert 2 * topo.threshold < topo.m
    assert topo.source == str(path)


def test_default_config_is_three_local_parties_threshold_one():
    topo = Topology.load(ROOT / "configs" / "local-3.yaml")
    assert topo.m == 3 and topo.threshold == 1
    assert all(a.host == "127.0.0.1" for a in topo.aggregators)
    assert topo.leader.index == 0
    assert topo.secure_arrays_available
    assert not Topology.load(ROOT / "configs" / "local-2.yaml").secure_arrays_available


def test_mpyc_argv_from_topology():
    topo = Topology.load(ROOT / "configs" / "local-3.yaml")
    argv = mpyc_argv(topo, 2)
    assert argv[:6] == ["-P", "127.0.0.1:11365", "-P", "127.0.0.1:11366", "-P", "127.0.0.1:11367"]
    assert argv[6:10] == ["-I", "2", "-T", "1"]
    with pytest.raises(ValueError, match="0..2"):
        mpyc_argv(topo, 3)


BASE = {
    "name": "t",
    "threshold": 1,
    "aggregators": [
        {"host": "127.0.0.1", "mpc_port": 1001, "http_port": 2001},
        {"host": "127.0.0.1", "mpc_port": 1002, "http_port": 2002},
        {"host": "127.0.0.1", "mpc_port": 1003, "http_port": 2003},
    ],
    "rounds": {"min_clients": 2, "max_clients": 100, "max_dim": 1000},
    "encoding": {"frac_bits": 16, "coord_clip": 10.0, "l2_clip": None},
}


def doc(**changes):
    d = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = d
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return d


DELETE = object()
DP = {
    "mechanism": "discrete_gaussian",
    "epsilon": 1.0,
    "delta": 1e-5,
    "l2_clip": 1.0,
    "max_colluding": 1,
    "budget": {"epsilon": 8.0, "delta": 1e-4},
}


def test_base_document_is_valid():
    topo = Topology.from_dict(doc())
    assert topo.rounds.max_clients == 100 and topo.encoding.frac_bits == 16


def test_defaults_fill_optional_sections():
    d = doc()
    for key in ("rounds", "encoding", "threshold"):
        del d[key]
    topo = Topology.from_dict(d)
    assert topo.threshold == 1  # (m - 1) // 2
    assert topo.rounds.min_clients == 2
    assert topo.rounds.upload_buffer_bytes == 128 * 2**20 and topo.rounds.keep_results == 4
    assert topo.encoding.coord_clip == 1000.0
    assert str(topo.data_dir) == ".mpc_agg-data/t"


@pytest.mark.parametrize(
    ("data", "path", "words"),
    [
        (doc(extra=1), "extra", "unknown key 'extra'"),
        (doc(dp={"mechanism": "discrete_gaussian"}), "dp.epsilon", "missing required key"),
        (
            doc(dp=dict(DP, mechanism="gauss")),
            "dp.mechanism",
            "discrete_gaussian, binomial or none",
        ),
        (
            doc(dp=dict(DP, mechanism="binomial", max_colluding=2), threshold=1),
            "dp.max_colluding",
            "exceeds threshold",
        ),
        (doc(dp=dict(DP, epsilon=0)), "dp.epsilon", "positive"),
        (doc(dp=dict(DP, delta=1.0)), "dp.delta", "in (0, 1)"),
        (doc(dp=dict(DP, l2_clip=-1)), "dp.l2_clip", "positive"),
        (doc(dp=dict(DP, max_colluding=3)), "dp.max_colluding", "0..2"),
        (
            doc(dp=dict(DP, budget={"epsilon": 0.5, "delta": 1e-4})),
            "dp.budget",
            "smaller than one round",
        ),
        (doc(dp=dict(DP, budget={"epsilon": 8})), "dp.budget.delta", "missing"),
        (doc(dp=dict(DP, extra=1)), "dp.extra", "unknown key"),
        (doc(dp=DP, encoding__l2_clip=5.0), "encoding.l2_clip", "differs from dp.l2_clip"),
        (doc(tls={"dir": "x", "extra": 1}), "tls", "the tls and auth sections are gone"),
        (doc(auth={}), "auth", "the tls and auth sections are gone"),
        (doc(insecure="yes"), "insecure", "expected bool"),
        (
            doc(insecure=True, aggregators__2__host="10.1.2.3"),
            "insecure",
            "allowed only when every aggregator is on loopback; 10.1.2.3 is not",
        ),
        (doc(aggregators__0__party_cert="x"), "aggregators[0].party_cert", "PEM certificate"),
        (doc(aggregators__1__http_cert=5), "aggregators[1].http_cert", "PEM certificate"),
        (doc(aggregators__2__signing_key="00"), "aggregators[2].signing_key", "64 lowercase hex"),
        (doc(rounds__bogus=3), "rounds.bogus", "allowed keys"),
        (doc(encoding__fracbits=3), "encoding.fracbits", "unknown key"),
        (doc(aggregators__1__port=5), "aggregators[1].port", "unknown key"),
        (doc(name=DELETE), "name", "missing required key"),
        (doc(aggregators__0__http_port=DELETE), "aggregators[0].http_port", "missing"),
        (
            doc(aggregators__2__http_port=2001),
            "aggregators[2].http_port",
            "already used by aggregators[0].http_port",
        ),
        (
            doc(aggregators__1__mpc_port=2003),
            "aggregators[2].http_port",
            "already used by aggregators[1].mpc_port",
        ),
        (doc(aggregators__0__mpc_port=70000), "aggregators[0].mpc_port", "1..65535"),
        (doc(aggregators__0__mpc_port="1001"), "aggregators[0].mpc_port", "expected int, got str"),
        (doc(threshold=True), "threshold", "expected int, got bool"),
        (doc(threshold=2), "threshold", "2t < m"),
        (doc(threshold=-1), "threshold", "honest majority"),
        (doc(rounds__min_clients=1), "rounds.min_clients", ">= 2"),
        (
            doc(aggregators__1__host="localhost", aggregators__1__mpc_port=1001),
            "aggregators[1].mpc_port",
            "already used by aggregators[0].mpc_port",
        ),
        (doc(rounds__max_clients=1), "rounds.max_clients", "below min_clients"),
        (doc(rounds__max_dim=0), "rounds.max_dim", "1.."),
        (doc(encoding__frac_bits=41), "encoding.frac_bits", "0..40"),
        (doc(encoding__coord_clip=-1.0), "encoding.coord_clip", "positive"),
        (doc(encoding__coord_clip=None), "encoding", "coord_clip and/or l2_clip"),
        (doc(encoding__coord_clip="big"), "encoding.coord_clip", "finite number"),
        (doc(name="has space"), "name", "letters"),
        (doc(aggregators__0__host="a b"), "aggregators[0].host", "host"),
        (doc(fsync="yes"), "fsync", "expected bool"),
        (
            doc(rounds__max_dim=1_000_000, rounds__upload_buffer_mb=4),
            "rounds.upload_buffer_mb",
            "cannot hold one full share of max_dim = 1000000 (7.6 MiB); raise it to at least 8",
        ),
    ],
)
def test_invalid_documents_name_path_and_value(data, path, words):
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(data, source="cfg.yaml")
    assert err.value.path == path
    assert words in str(err.value)
    assert str(err.value).startswith("cfg.yaml: ")


def test_two_aggregators_with_threshold_one_explains_additive_path():
    d = doc(threshold=1)
    d["aggregators"] = d["aggregators"][:2]
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(d)
    assert "threshold: 0" in str(err.value) and "additive path" in str(err.value)


def test_one_aggregator_is_refused():
    d = doc(threshold=0)
    d["aggregators"] = d["aggregators"][:1]
    with pytest.raises(ConfigError, match="2..16 aggregators"):
        Topology.from_dict(d)


def test_overflow_headroom_is_checked_against_max_clients():
    # Largest max_clients that cannot wrap: max_clients * ceil(clip * 2^f) < p/2.
    enc_bound = 10 * 2**30
    limit = HALF // enc_bound  # smallest count with count * bound >= HALF is limit + 1 here
    if limit * enc_bound >= HALF:
        limit -= 1
    ok = doc(encoding__frac_bits=30, rounds__max_clients=limit)
    assert Topology.from_dict(ok).rounds.max_clients == limit
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(encoding__frac_bits=30, rounds__max_clients=limit + 1))
    assert err.value.path == "rounds.max_clients"
    assert "wrap around" in str(err.value)


def test_l2_clip_alone_bounds_coordinates():
    topo = Topology.from_dict(doc(encoding__coord_clip=None, encoding__l2_clip=2.0))
    assert topo.encoding.max_abs_coordinate == 2.0


def test_bad_yaml_names_line(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\naggregators: [\n  - {host: 1\n")
    with pytest.raises(ConfigError) as err:
        Topology.load(p)
    assert "not valid YAML at line" in str(err.value)
    assert str(p) in str(err.value)


def test_missing_file_and_non_mapping(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read topology"):
        Topology.load(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        Topology.load(p)


def test_topology_is_frozen():
    topo = Topology.from_dict(doc())
    with pytest.raises(AttributeError):
        topo.threshold = 0  # type: ignore[misc]


def test_binomial_with_two_aggregators_is_refused_with_its_reason():
    d = doc(threshold=0, dp=dict(DP, mechanism="binomial", max_colluding=0))
    d["aggregators"] = d["aggregators"][:2]
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(d)
    assert err.value.path == "dp.mechanism"
    assert "m >= 3" in str(err.value) and "threshold is 0" in str(err.value)


def test_dp_section_sets_the_encoding_l2_clip():
    topo = Topology.from_dict(doc(dp=DP))
    assert topo.dp is not None and topo.dp.epsilon == 1.0 and topo.dp.budget_delta == 1e-4
    assert topo.encoding.l2_clip == 1.0
    assert Topology.from_dict(doc(dp={"mechanism": "none"})).dp is None
