"""Differential privacy with real aggregator processes: the revealed error has the announced
standard deviation, and the budget holds across rounds and restarts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpc_agg import Client, Collector, RoundFailed, Topology
from mpc_agg.launcher import LocalFederation

from .conftest import topology_doc, write_topology

pytestmark = pytest.mark.processes


def dp_doc(name: str, budget_epsilon: float) -> dict:
    doc = topology_doc(3, 1, name=name)
    doc["encoding"] = {"frac_bits": 16, "coord_clip": None}
    doc["dp"] = {
        "mechanism": "skellam",
        "epsilon": 1.0,
        "delta": 1e-5,
        "l2_clip": 1.0,
        "max_colluding": 1,
        "budget": {"epsilon": budget_epsilon, "delta": 1e-4},
    }
    return doc


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * 0.9  # inside the L2 clip


def test_noisy_round_error_matches_the_announced_stddev(tmp_path):
    d = 20_000
    config = write_topology(tmp_path, dp_doc("dpround", budget_epsilon=8.0))
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        collector = Collector(topo)
        collector.open_round("r", d)
        announced = collector.status("r")[0]["dp"]["noise_stddev"]
        data = unit_vectors(5, d, seed=1)
        for i, x in enumerate(data):
            Client(topo, f"c{i}").submit("r", x)
        result = collector.aggregate("r", timeout=60)
    assert (result.epsilon, result.delta) == (1.0, 1e-5)
    assert result.noise_stddev == pytest.approx(announced)
    assert 0 < result.cumulative_epsilon <= 8.0 and result.cumulative_delta == 1e-4
    error = result.total - data.sum(axis=0)
    # Sample std over d coordinates has relative standard error 1/sqrt(2d) = 0.5 %: a 4 %
    # band is 8 standard errors (false-failure rate < 1e-14); likewise for the mean.
    assert np.std(error) == pytest.approx(result.noise_stddev, rel=0.04)
    assert abs(np.mean(error)) < 8 * result.noise_stddev / np.sqrt(d)
    # The noise is real: far above the encoding's rounding error.
    assert np.std(error) > 100 * 2.0**-16


def test_budget_refuses_the_next_round_also_after_a_restart(tmp_path):
    config = write_topology(tmp_path, dp_doc("budget", budget_epsilon=1.2))
    data = unit_vectors(2, 100, seed=2)

    def run_round(fed: LocalFederation, round_id: str) -> object:
        collector = Collector(fed.topology)
        collector.open_round(round_id, 100)
        for i, x in enumerate(data):
            Client(fed.topology, f"{round_id}-c{i}").submit(round_id, x)
        return collector.aggregate(round_id, timeout=60)

    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        first = run_round(fed, "r1")
        assert first.cumulative_epsilon <= 1.2
        with pytest.raises(RoundFailed) as refused:
            run_round(fed, "r2")
        assert "over the budget of 1.2" in refused.value.reason
        assert "refused before any noise or reveal" in refused.value.reason

    # Every aggregator restarts from its ledger on disk: the budget is still spent.
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        with pytest.raises(RoundFailed, match="over the budget"):
            run_round(fed, "r3")
    topo = Topology.load(config)
    for i in range(3):
        lines = (tmp_path / topo.ledger_path(i)).read_text().splitlines()
        assert len(lines) == 1 and '"round": "r1"' in lines[0]
