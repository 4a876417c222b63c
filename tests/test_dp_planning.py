"""Noise planning: plan_noise reads any object with the dp section's attributes (a Protocol
in dp, no config import), and maps the pure math's ParameterError to a ConfigError at the
YAML key to change; dp_accounting and scipy are imported only when used."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from mpc_agg import ConfigError, Topology
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.dp.binomial import SensitivityTooLarge, calibrate_binomial
from mpc_agg.dp.checks import ParameterError
from mpc_agg.dp.planning import Mechanism, NoisePlan, plan_noise

from .conftest import ROOT
from .test_import_hygiene import DP_LAZY, import_results


@dataclass(frozen=True)
class Settings:
    """A stand-in for DPSettings: plain attributes, no checks."""

    mechanism: str = "discrete_gaussian"
    epsilon: float = 1.0
    delta: float = 1e-5
    l2_clip: float = 1.0
    max_colluding: int = 1


@dataclass(frozen=True)
class Encoding:
    frac_bits: int = 8

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)


def test_plan_from_plain_attributes_equals_plan_from_the_topology() -> None:
    topo = Topology.load(ROOT / "configs" / "dp-gaussian-3.yaml")
    assert topo.dp is not None
    ours = plan_noise(
        Settings(
            epsilon=topo.dp.epsilon,
            delta=topo.dp.delta,
            l2_clip=topo.dp.l2_clip,
            max_colluding=topo.dp.max_colluding,
        ),
        Encoding(topo.encoding.frac_bits),
        100,
        topo.m,
    )
    assert ours == plan_noise(topo.dp, topo.encoding, 100, topo.m)
    assert ours.mechanism is Mechanism.DISCRETE_GAUSSIAN
    assert ours.mechanism == "discrete_gaussian"


def test_binomial_plan_and_its_event() -> None:
    plan = plan_noise(Settings(mechanism="binomial"), Encoding(0), 4, 3)
    assert plan.mechanism is Mechanism.BINOMIAL and plan.mechanism == "binomial"
    assert plan.trials == calibrate_binomial(1.0, 1e-5, 1.0 + 2.0, 4)
    event = plan.event("r1")
    assert type(event.mechanism) is str and event.mechanism == "binomial"
    assert json.loads(event.to_json())["mechanism"] == "binomial"
    assert plan.secure_bits == plan.trials * 4


def test_discrete_gaussian_event_is_a_plain_string() -> None:
    plan = plan_noise(Settings(), Encoding(), 10, 3)
    event = plan.event("r")
    assert type(event.mechanism) is str and event.mechanism == "discrete_gaussian"
    assert isinstance(plan, NoisePlan) and plan.sigma2 >= 1 and plan.tail > 0


@pytest.mark.parametrize(
    ("settings", "encoding", "d", "path", "detail"),
    [
        (Settings(epsilon=0.0), Encoding(), 1, "dp.epsilon", "must be a positive finite number"),
        (Settings(delta=1.0), Encoding(), 1, "dp.delta", "must be in (0, 1), got 1.0"),
        (Settings(l2_clip=-1.0), Encoding(), 1, "dp.l2_clip", "positive finite"),
        (Settings(), Encoding(-1), 1, "encoding.frac_bits", "must be an integer >= 0"),
        (Settings(), Encoding(), 0, "dimension", "must be an integer >= 1, got 0"),
        (Settings(max_colluding=3), Encoding(), 1, "dp.max_colluding", ">= 1, got 0"),
        (Settings(mechanism="gauss"), Encoding(), 1, "dp.mechanism", "got 'gauss'"),
        (
            Settings(mechanism="binomial"),
            Encoding(8),
            1,
            "dp.mechanism",
            "use discrete_gaussian, or lower frac_bits/l2_clip",
        ),
        (Settings(epsilon=1e-3), Encoding(30), 10**6, "dp", "lower encoding.frac_bits"),
    ],
)
def test_refusals_are_config_errors_at_the_yaml_key(settings, encoding, d, path, detail) -> None:
    with pytest.raises(ConfigError) as err:
        plan_noise(settings, encoding, d, 3)
    assert err.value.path == path
    assert detail in err.value.detail
    assert str(err.value) == f"{path}: {err.value.detail}"


def test_joint_noise_beyond_the_bit_limit_is_refused(monkeypatch) -> None:
    from mpc_agg.dp import planning

    monkeypatch.setattr(planning, "MAX_JOINT_BITS", 10)
    with pytest.raises(ConfigError) as err:
        plan_noise(Settings(mechanism="binomial"), Encoding(0), 4, 3)
    assert err.value.path == "dp.mechanism" and "secret bits per coordinate" in err.value.detail


def test_the_translated_message_is_the_pure_functions_detail() -> None:
    with pytest.raises(SensitivityTooLarge) as pure:
        calibrate_binomial(1.0, 1e-5, 2.0**8 + 1.0, 1)
    with pytest.raises(ConfigError) as config:
        plan_noise(Settings(mechanism="binomial"), Encoding(8), 1, 3)
    assert config.value.detail == pure.value.detail
    assert isinstance(pure.value, ParameterError) and isinstance(pure.value, ValueError)
    assert not isinstance(pure.value, ConfigError)


def test_the_real_encoding_meets_the_protocol() -> None:
    enc = FixedPointEncoding(frac_bits=4, coord_clip=None, l2_clip=1.0)
    assert plan_noise(Settings(), enc, 3, 3).scale == 16.0


def test_dp_accounting_and_scipy_are_imported_lazily() -> None:
    # import mpc_agg.dp.planning, ..., mpc_agg.config in fresh interpreter state (the import
    # hygiene checks' subprocess, shared with them).
    out = import_results()[DP_LAZY]
    assert out["ok"], out["error"]
    assert out["scipy_or_dp_accounting"] == []
