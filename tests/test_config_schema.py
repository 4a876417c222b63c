"""The topology objects validate themselves: built in code they refuse what YAML would refuse,
with the same YAML path and message; the keys a section allows are its dataclass's fields;
schema and load import each other in one direction only."""

from __future__ import annotations

import ast
import copy
from dataclasses import fields, replace
from pathlib import Path

import pytest

from mpc_agg import ConfigError, Topology
from mpc_agg.config import (
    AggregatorAddress,
    Deadlines,
    DPSettings,
    Mechanism,
    RoundPolicy,
)
from mpc_agg.config.load import yaml_keys
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.field import HALF

from .conftest import ROOT
from .test_config import BASE, DP


def dp_settings(**changes: object) -> DPSettings:
    args: dict[str, object] = dict(
        mechanism="discrete_gaussian",
        epsilon=1.0,
        delta=1e-5,
        l2_clip=1.0,
        max_colluding=1,
        budget_epsilon=8.0,
        budget_delta=1e-4,
    )
    return DPSettings(**(args | changes))  # type: ignore[arg-type]


def doc(**sections: object) -> dict:
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(sections))
    return d


# --------------------------------------------------------------------------- in code


@pytest.mark.parametrize(
    ("build", "path", "words"),
    [
        (lambda: RoundPolicy(min_clients=0), "rounds.min_clients", "must be >= 2, got 0"),
        (lambda: RoundPolicy(min_clients=True), "rounds.min_clients", "expected int, got bool"),
        (lambda: RoundPolicy(min_clients=5, max_clients=4), "rounds.max_clients", "below"),
        (lambda: RoundPolicy(max_dim=0), "rounds.max_dim", "1.."),
        (lambda: RoundPolicy(max_concurrent_uploads=0), "rounds.max_concurrent_uploads", ">= 1"),
        (lambda: RoundPolicy(keep_results=0), "rounds.keep_results", ">= 1"),
        (
            lambda: RoundPolicy(max_dim=1_000_000, upload_buffer_mb=4),
            "rounds.upload_buffer_mb",
            "raise it to at least 8",
        ),
        (lambda: Deadlines(step_s=0), "deadlines.step_s", "(0, 86400]"),
        (lambda: Deadlines(upload_s=True), "deadlines.upload_s", "expected seconds"),
        (lambda: AggregatorAddress(1, "a b", 1, 2), "aggregators[1].host", "host name"),
        (lambda: AggregatorAddress(1, "h", 0, 2), "aggregators[1].mpc_port", "1..65535"),
        (lambda: AggregatorAddress(2, "h", 1, "2"), "aggregators[2].http_port", "expected int"),
        (lambda: AggregatorAddress(0, "h", 1, 2, "ftp"), "aggregators[0].scheme", "https"),
        (
            lambda: AggregatorAddress(0, "h", 1, 2, party_cert="not a PEM"),
            "aggregators[0].party_cert",
            "expected a PEM certificate",
        ),
        (
            lambda: AggregatorAddress(1, "h", 1, 2, http_cert="MIIB..."),
            "aggregators[1].http_cert",
            "expected a PEM certificate",
        ),
        (
            lambda: AggregatorAddress(2, "h", 1, 2, signing_key="AB" * 32),
            "aggregators[2].signing_key",
            "64 lowercase hex characters",
        ),
        (
            lambda: AggregatorAddress(0, "h", 1, 2, signing_key="ab" * 31),
            "aggregators[0].signing_key",
            "64 lowercase hex characters",
        ),
        (lambda: dp_settings(mechanism="gauss"), "dp.mechanism", "discrete_gaussian, binomial"),
        (lambda: dp_settings(mechanism="skellam"), "dp.mechanism", "no longer offered"),
        (lambda: dp_settings(epsilon=0), "dp.epsilon", "positive"),
        (lambda: dp_settings(delta=1.0), "dp.delta", "in (0, 1)"),
        (lambda: dp_settings(l2_clip="1"), "dp.l2_clip", "expected a number"),
        (lambda: dp_settings(max_colluding=-1), "dp.max_colluding", ">= 0"),
        (lambda: dp_settings(budget_delta=2.0), "dp.budget.delta", "in (0, 1)"),
        (lambda: dp_settings(budget_epsilon=0.5), "dp.budget", "smaller than one round"),
    ],
)
def test_objects_built_in_code_are_checked_at_their_yaml_path(build, path, words) -> None:
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.path == path
    assert words in err.value.detail


def test_valid_objects_are_normalised() -> None:
    assert Deadlines(step_s=5).step_s == 5.0 and isinstance(Deadlines(step_s=5).step_s, float)
    assert AggregatorAddress(0, "h", 1, 2).url == "https://h:2"  # https unless insecure
    assert not AggregatorAddress(0, "h", 1, 2).has_keys
    dp = dp_settings(mechanism="binomial", epsilon=1)
    assert dp.mechanism is Mechanism.BINOMIAL and dp.mechanism == "binomial"
    assert isinstance(dp.epsilon, float)
    assert RoundPolicy().upload_buffer_bytes == 128 << 20


def test_mechanism_is_a_str_enum() -> None:
    assert Mechanism("discrete_gaussian") is Mechanism.DISCRETE_GAUSSIAN
    assert Mechanism.BINOMIAL == "binomial" and f"{Mechanism.BINOMIAL}" == "binomial"
    assert str(Mechanism.DISCRETE_GAUSSIAN) == "discrete_gaussian"
    topo = Topology.from_dict(doc(dp=DP))
    assert topo.dp is not None and topo.dp.mechanism is Mechanism.DISCRETE_GAUSSIAN


def test_a_topology_changed_in_code_is_checked_again() -> None:
    topo = Topology.from_dict(doc(), source="cfg.yaml")
    with pytest.raises(ConfigError) as err:
        replace(topo, threshold=2)
    assert err.value.path == "threshold" and str(err.value).startswith("cfg.yaml: ")
    with pytest.raises(ConfigError, match="need 2..16"):
        replace(topo, aggregators=topo.aggregators[:1])
    with pytest.raises(ConfigError) as err:
        replace(topo, aggregators=topo.aggregators[::-1])
    assert err.value.path == "aggregators[0]"
    with pytest.raises(ConfigError) as err:
        replace(topo, rounds={"min_clients": 2})
    assert err.value.path == "rounds" and "expected RoundPolicy" in err.value.detail
    with pytest.raises(ConfigError) as err:  # the encoding must clip to dp.l2_clip
        replace(topo, dp=dp_settings())
    assert err.value.path == "encoding.l2_clip" and "differs from dp.l2_clip" in err.value.detail
    with_dp = replace(
        topo, dp=dp_settings(), encoding=FixedPointEncoding(16, coord_clip=10.0, l2_clip=1.0)
    )
    assert with_dp.dp is not None and with_dp.source == "cfg.yaml"
    with pytest.raises(ConfigError) as err:
        replace(with_dp, dp=dp_settings(max_colluding=3))
    assert err.value.path == "dp.max_colluding" and "0..2" in err.value.detail


def test_headroom_includes_the_noise_of_a_round_of_dimension_1() -> None:
    # The most clients whose values alone stay below p/2: with the noise tail they do not.
    enc = FixedPointEncoding(frac_bits=25, coord_clip=None, l2_clip=1.0)
    most = (HALF - 1) // enc.max_abs_encoded
    enc.check_headroom(most)
    d = doc(dp=DP, encoding={"frac_bits": 25, "coord_clip": None}, rounds={"max_clients": most})
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(d)
    assert err.value.path == "rounds.max_clients" and "wrap around" in err.value.detail
    assert "noise tail 0)" not in err.value.detail
    assert Topology.from_dict(doc(dp=DP, rounds={"max_clients": most // 2}, encoding=d["encoding"]))


# --------------------------------------------------------------------------- YAML keys


def test_allowed_keys_are_the_dataclass_fields() -> None:
    assert yaml_keys(RoundPolicy) == sorted(f.name for f in fields(RoundPolicy))
    assert yaml_keys(Deadlines) == ["startup_s", "step_s", "upload_s"]
    assert yaml_keys(AggregatorAddress) == [
        "host",
        "http_cert",
        "http_port",
        "mpc_port",
        "party_cert",
        "signing_key",
    ]
    assert yaml_keys(DPSettings) == [
        "budget",
        "delta",
        "epsilon",
        "l2_clip",
        "max_colluding",
        "mechanism",
    ]
    assert yaml_keys(DPSettings, "budget") == ["delta", "epsilon"]
    assert yaml_keys(FixedPointEncoding) == ["coord_clip", "frac_bits", "l2_clip", "ring"]
    assert "source" not in yaml_keys(Topology)
    assert set(yaml_keys(Topology)) == {f.name for f in fields(Topology)} - {"source"}


def test_unknown_key_lists_the_fields() -> None:
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(rounds={"bogus": 1}))
    assert ", ".join(sorted(f.name for f in fields(RoundPolicy))) in err.value.detail
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(dp=dict(DP, budget={"epsilon": 8.0, "delta": 1e-4, "x": 1})))
    assert err.value.path == "dp.budget.x" and "allowed keys: delta, epsilon" in err.value.detail


def test_dp_defaults_and_nulls() -> None:
    without = {k: v for k, v in DP.items() if k != "max_colluding"}
    topo = Topology.from_dict(doc(dp=without, threshold=1))
    assert topo.dp is not None and topo.dp.max_colluding == 1  # the threshold
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(dp=dict(DP, budget=None)))
    assert err.value.path == "dp.budget" and "expected dict" in err.value.detail
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(dp=dict(DP, epsilon=None)))
    assert err.value.path == "dp.epsilon" and "expected a number, got None" in err.value.detail
    null_rounds = Topology.from_dict(doc(rounds={"min_clients": None}, deadlines=None))
    assert null_rounds.rounds.min_clients == 2 and null_rounds.deadlines == Deadlines()


def test_addresses_are_https_unless_insecure_and_paths_resolve() -> None:
    topo = Topology.from_dict(doc())
    assert not topo.insecure and not topo.has_keys  # a template: no keys
    assert all(a.scheme == "https" and a.url.startswith("https://") for a in topo.aggregators)
    plain = Topology.from_dict(doc(insecure=True))
    assert plain.insecure
    assert all(a.url.startswith("http://") for a in plain.aggregators)
    # Built in code, the scheme of every address follows ``insecure`` both ways.
    assert all(a.scheme == "http" for a in replace(topo, insecure=True).aggregators)
    assert all(a.scheme == "https" for a in replace(plain, insecure=False).aggregators)
    absolute = topo.with_absolute_paths()
    assert absolute.data_dir.is_absolute() and absolute.aggregators == topo.aggregators


@pytest.mark.parametrize("section", ["tls", "auth"])
def test_tls_and_auth_sections_are_refused_with_the_migration_message(section: str) -> None:
    value = {"dir": "tls/x"} if section == "tls" else {"secrets_dir": "s"}
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc(**{section: value}), source="cfg.yaml")
    assert err.value.path == section
    assert "the tls and auth sections are gone" in err.value.detail
    assert "insecure: true on loopback" in err.value.detail
    assert "Security model" in err.value.detail
    assert str(err.value).startswith(f"cfg.yaml: {section}: ")


def test_insecure_is_refused_with_a_host_off_loopback() -> None:
    remote = doc(insecure=True)
    remote["aggregators"][1]["host"] = "10.0.0.2"
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(remote, source="cfg.yaml")
    assert err.value.path == "insecure" and "10.0.0.2" in err.value.detail
    assert "only when every aggregator is on loopback" in err.value.detail
    remote["insecure"] = False
    assert Topology.from_dict(remote).aggregators[1].url == "https://10.0.0.2:2002"
    topo = Topology.from_dict(doc())
    moved = topo.aggregators[:2] + (replace(topo.aggregators[2], host="example.org"),)
    with pytest.raises(ConfigError) as err:  # in code too
        replace(topo, insecure=True, aggregators=moved)
    assert err.value.path == "insecure" and "example.org" in err.value.detail
    for host in ("localhost", "LocalHost"):
        local = doc(insecure=True)
        local["aggregators"][0]["host"] = host
        assert Topology.from_dict(local).insecure


def test_binomial_sensitivity_beyond_exact_accounting_is_a_config_error() -> None:
    d = doc(dp=dict(DP, mechanism="binomial"), encoding={"frac_bits": 8, "coord_clip": None})
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(d, source="cfg.yaml")
    assert err.value.path == "dp.mechanism"
    assert "limited to small sensitivities" in err.value.detail
    assert "use discrete_gaussian, or lower frac_bits/l2_clip" in str(err.value)
    assert str(err.value).startswith("cfg.yaml: dp.mechanism: ")


def test_shipped_binomial_config_has_a_binomial_mechanism() -> None:
    topo = Topology.load(ROOT / "configs" / "dp-binomial-3.yaml")
    assert topo.dp is not None and topo.dp.mechanism is Mechanism.BINOMIAL


# --------------------------------------------------------------------------- imports


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, id(node) in top) for alias in node.names)
    return out


def test_schema_and_load_import_each_other_in_one_direction_only() -> None:
    config = ROOT / "mpc_agg" / "config"
    load_imports = _imports(config / "load.py")
    assert not [m for m, _ in load_imports if m.startswith("mpc_agg.config")]
    schema_imports = _imports(config / "schema.py")
    assert ("mpc_agg.config.load", True) in schema_imports
    assert all(top for _, top in schema_imports), "no function-level imports in schema.py"


def test_dp_imports_nothing_from_config() -> None:
    for path in sorted((ROOT / "mpc_agg" / "dp").glob("*.py")):
        for module, _ in _imports(path):
            assert not module.startswith("mpc_agg.config"), f"{path.name} imports {module}"
