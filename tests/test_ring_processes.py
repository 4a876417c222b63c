"""Rounds in Z_(2^32) (``encoding: {ring: z2_32}``) among three real aggregator processes,
started by the launcher users run: the total is exact without DP and carries the announced
discrete Gaussian noise with it; uploads are 4 bytes per coordinate."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mpc_agg.core.ring import Z2_32
from mpc_agg.launcher import LocalFederation

from .conftest import dp_topology_doc, topology_doc, write_topology

pytestmark = pytest.mark.processes


def test_three_party_round_in_z2_32_reveals_the_exact_total(tmp_path):
    doc = topology_doc(3, 1, name="ring3")
    doc["encoding"] = {"ring": "z2_32", "frac_bits": 16, "coord_clip": 1.0}
    config = write_topology(tmp_path, doc)
    d = 50_000
    units = np.random.default_rng(7).integers(-(2**16), 2**16 + 1, size=(6, d))
    units[:, 1] = -(2**16)  # a negative total: the centered lift
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        assert fed.deployment.topology().encoding.ring is Z2_32
        collector = fed.collector()
        collector.open_round("r", d)
        for i, x in enumerate(units):
            client = fed.client(f"c{i}")
            bodies = client.prepare("r", x / 2.0**16)
            assert max(len(b) for b in bodies) == 12 + 4 * d  # 4 bytes per coordinate
            client.submit("r", x / 2.0**16)
        result = collector.aggregate("r", timeout=60)
    assert result.num_clients == 6 and result.field_total.dtype == np.uint32
    assert np.array_equal(Z2_32.to_signed(result.field_total), units.sum(axis=0))
    assert result.total[1] == -6.0
    assert len(result.statements) == 3  # verified against all three signatures


def test_three_party_round_in_z2_32_with_discrete_gaussian_noise(tmp_path):
    doc = dp_topology_doc("ringdp3", budget_epsilon=8.0)
    doc["encoding"] = {"ring": "z2_32", "frac_bits": 16, "coord_clip": None}
    config = write_topology(tmp_path, doc)
    d = 20_000
    data = np.random.default_rng(8).normal(size=(5, d))
    data *= 0.9 / np.linalg.norm(data, axis=1, keepdims=True)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        collector.open_round("r", d)
        announced = collector.status("r")[0]["dp"]["noise_stddev"]
        for i, x in enumerate(data):
            fed.client(f"c{i}").submit("r", x)
        result = collector.aggregate("r", timeout=60)
    assert result.field_total.dtype == np.uint32
    assert (result.epsilon, result.delta) == (1.0, 1e-5)
    assert result.noise_stddev == pytest.approx(announced)
    error = result.total - data.sum(axis=0)
    # Relative standard error of the sample std: 1/sqrt(2d) = 0.5 %; 4 % is 8 of them.
    assert np.std(error) == pytest.approx(result.noise_stddev, rel=0.04)
    assert abs(np.mean(error)) < 8 * result.noise_stddev / np.sqrt(d)
    assert np.std(error) > 100 * 2.0**-16
