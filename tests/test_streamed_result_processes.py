"""Streamed results among three real aggregator processes (the launcher users run, the
default topology configs/local-3.yaml on free ports): each party noises its share and
receives the total in place, the leader streams the result, and the collector writes it
into a memory-mapped ``.npy`` that appears only once every statement verified; a result
changed on the wire is refused with no file left; ``mpc-agg collect --out x.npy`` end to
end, with ``mpc-agg verify`` of its signed ``.npz``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from mpc_agg.cli import main
from mpc_agg.collector import verify_saved
from mpc_agg.core import codec
from mpc_agg.core.statement import ResultMismatch
from mpc_agg.errors import MalformedUpload
from mpc_agg.launcher import LocalFederation

from .conftest import dp_topology_doc, write_topology
from .test_cli_rounds import cli, local3, ok

pytestmark = pytest.mark.processes

D = 300_000
"""2.4 MB of GF(p) total: above codec.RESULT_STREAM_BYTES, so the leader streams it."""


def exact_vectors(n: int, seed: int) -> np.ndarray:
    """Vectors whose sum the encoding (frac_bits 24) carries exactly."""
    return np.random.default_rng(seed).integers(-(2**20), 2**20, size=(n, D)) / 2.0**12


def submit(fed: LocalFederation, round_id: str, xs: np.ndarray) -> None:
    fed.collector().open_round(round_id, D)
    for k, x in enumerate(xs):
        fed.client(f"c{k}").submit(round_id, x)


def test_three_parties_stream_the_exact_total_into_a_memory_mapped_npy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert D * 8 > codec.RESULT_STREAM_BYTES
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with LocalFederation(local3(tmp_path), cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector(timeout_s=60.0)
        xs = exact_vectors(3, seed=1)
        submit(fed, "r1", xs)
        result = collector.aggregate("r1", timeout=120, out=out_dir / "total.npy")
        assert isinstance(result.total, np.memmap) and result.num_clients == 3
        assert np.array_equal(np.load(out_dir / "total.npy"), xs.sum(axis=0))
        assert np.array_equal(result.field_total, collector.aggregate("r1").field_total)
        saved = out_dir / "r1.npz"
        result.save(saved)
        assert verify_saved(fed.deployment.topology(), saved).num_clients == 3

        # The next round's result changed on the wire, one byte late in the body: refused,
        # and neither the .npy nor a partial file is left.
        honest = aiohttp.StreamReader.readexactly

        async def flip_a_late_byte(self: aiohttp.StreamReader, n: int) -> bytes:
            data = await honest(self, n)
            if n == 8 * D:  # the whole total in one slice: change its last value
                data = data[:-8] + bytes([data[-8] ^ 0x02]) + data[-7:]
            return data

        submit(fed, "r2", exact_vectors(2, seed=2))
        monkeypatch.setattr(aiohttp.StreamReader, "readexactly", flip_a_late_byte)
        with pytest.raises((ResultMismatch, MalformedUpload)):
            collector.aggregate("r2", timeout=120, out=out_dir / "tampered.npy")
        monkeypatch.undo()
        assert sorted(p.name for p in out_dir.iterdir()) == ["r1.npz", "total.npy"]
        # Fetched again untouched, the same result verifies.
        again = collector.aggregate("r2", timeout=120, out=out_dir / "r2.npy")
        assert again.num_clients == 2


def test_three_parties_noise_in_place_and_stream_a_dp_total(tmp_path: Path) -> None:
    doc = dp_topology_doc("streamdp", budget_epsilon=8.0)
    doc["rounds"]["max_dim"] = D
    config = write_topology(tmp_path, doc)
    data = np.random.default_rng(8).normal(size=(4, D))
    data *= 0.9 / np.linalg.norm(data, axis=1, keepdims=True)
    out = tmp_path / "noisy.npy"
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector(timeout_s=60.0)
        collector.open_round("r", D)
        for i, x in enumerate(data):
            fed.client(f"c{i}").submit("r", x)
        result = collector.aggregate("r", timeout=120, out=out)
    error = np.load(out) - data.sum(axis=0)
    # The std of D samples has relative standard error 1/sqrt(2 D) = 0.13 %; 1 % is 7.7 of them.
    assert np.std(error) == pytest.approx(result.noise_stddev, rel=0.01)
    assert abs(np.mean(error)) < 8 * result.noise_stddev / np.sqrt(D)
    assert (result.epsilon, result.delta) == (1.0, 1e-5)


def test_collect_out_npy_end_to_end(tmp_path: Path) -> None:
    config = local3(tmp_path)
    with open(os.devnull, "w") as sink, LocalFederation(config, cwd=tmp_path, output=sink) as fed:
        t = str(fed.config_path)
        collector_dir = tmp_path / "collector"
        for party_dir in fed.deployment.party_dirs:
            token = ["token", "--party-dir", str(party_dir)]
            assert main([*token, "--collector", "-o", str(collector_dir)]) == 0
        col = ["-t", t, "--tokens", str(collector_dir)]
        xs = exact_vectors(3, seed=3)
        submit(fed, "r1", xs)
        total, signed = tmp_path / "total.npy", tmp_path / "result.npz"
        out = ok("collect", *col, "-r", "r1", "--out", str(total), "--result", str(signed))
        assert "verified: all 3 aggregators signed it" in out and f"d = {D}" in out
        assert np.array_equal(np.load(total), xs.sum(axis=0))
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".npy", ".npz")) == [
            "result.npz",
            "total.npy",
        ]
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        out = ok("verify", "-t", t, str(signed))
        assert "ok:" in out and "round r1, 3 clients" in out and f"d = {D}" in out
        topology: Any = fed.deployment.topology()
        assert verify_saved(topology, signed).dim == D
        # An existing --out is kept without --force, replaced with it.
        rc, _, err = cli("collect", *col, "-r", "r1", "--out", str(total))
        assert rc == 2 and "--force" in err
        total.write_bytes(b"old")
        ok("collect", *col, "-r", "r1", "--out", str(total), "--force")
        assert np.array_equal(np.load(total), xs.sum(axis=0))
