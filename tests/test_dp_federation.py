"""Differential privacy with real aggregator processes: the revealed error has the announced
standard deviation, and the budget holds across rounds and restarts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpc_agg import RoundFailed, Topology
from mpc_agg.launcher import LocalFederation

from .conftest import dp_topology_doc, write_topology

pytestmark = pytest.mark.processes


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * 0.9  # inside the L2 clip


def test_noisy_round_error_matches_the_announced_stddev(tmp_path):
    d = 20_000
    config = write_topology(tmp_path, dp_topology_doc("dpround", budget_epsilon=8.0))
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        collector.open_round("r", d)
        announced = collector.status("r")[0]["dp"]["noise_stddev"]
        data = unit_vectors(5, d, seed=1)
        for i, x in enumerate(data):
            fed.client(f"c{i}").submit("r", x)
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
    config = write_topology(tmp_path, dp_topology_doc("budget", budget_epsilon=1.2))
    data = unit_vectors(2, 100, seed=2)

    def run_round(fed: LocalFederation, round_id: str) -> object:
        collector = fed.collector()
        collector.open_round(round_id, 100)
        for i, x in enumerate(data):
            fed.client(f"{round_id}-c{i}").submit(round_id, x)
        return collector.aggregate(round_id, timeout=60)

    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        first = run_round(fed, "r1")
        assert first.cumulative_epsilon <= 1.2
        with pytest.raises(RoundFailed) as refused:
            run_round(fed, "r2")
        assert "over the budget of 1.2" in refused.value.reason
        assert refused.value.code == "budget_exceeded"
        assert "refused before any noise or reveal" in refused.value.reason

    # Every aggregator restarts from its ledger on disk: the budget is still spent.
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        with pytest.raises(RoundFailed, match="over the budget"):
            run_round(fed, "r3")
    topo = Topology.load(config)
    for i in range(3):
        lines = (tmp_path / topo.ledger_path(i)).read_text().splitlines()
        assert len(lines) == 1 and '"round": "r1"' in lines[0]


def test_joint_binomial_histogram_round(tmp_path):
    d = 16
    doc = dp_topology_doc("binom", budget_epsilon=8.0)
    doc["encoding"] = {"frac_bits": 0, "coord_clip": None}
    doc["rounds"]["max_dim"] = 49
    doc["dp"]["mechanism"] = "binomial"
    config = write_topology(tmp_path, doc)
    rng = np.random.default_rng(3)
    counts = np.zeros(d)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        collector.open_round("h", d)
        plan = collector.status("h")[0]["dp"]
        assert plan["mechanism"] == "binomial" and plan["secure_bits"] == plan["trials"] * d
        for i in range(6):
            x = np.zeros(d)
            x[rng.integers(d)] = 1.0  # a one-hot histogram contribution
            counts += x
            fed.client(f"h{i}").submit("h", x)
        result = collector.aggregate("h", timeout=120)
    trials = plan["trials"]
    assert result.noise_stddev == pytest.approx(np.sqrt(trials / 4))
    assert result.epsilon == 1.0 and result.cumulative_epsilon <= 8.0
    error = result.total - counts
    assert np.array_equal(error, np.round(error))  # integer noise, frac_bits = 0
    assert np.abs(error).max() <= trials / 2  # binomial noise is bounded
    # sum of squared standardized errors ~ chi-square(16): outside [0.8, 70] has probability
    # below 1e-7 (all-zero noise: below 1e-20).
    chi2 = float(np.sum(error**2) / (trials / 4))
    assert 0.8 < chi2 < 70, chi2
