"""Fail closed with real aggregator processes: a DP round whose aggregator 1 sits on a full
disk fails at every party with nothing revealed; a round id cannot be released again after
every party restarts (docs/design.md, "Fail closed").

The full disk is a small tmpfs mounted on aggregator 1's data directory (root only; the test
is skipped with the reason otherwise) and filled to the last byte before the close.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mpc_agg import RoundFailed, Topology
from mpc_agg.errors import RemoteRefusal
from mpc_agg.launcher import LocalFederation

from .conftest import dp_topology_doc, write_topology

pytestmark = pytest.mark.processes

D = 100


def unit_vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * 0.9


def mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (the full disk) needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def fill_disk(directory: Path) -> Path:
    """Write a file in ``directory`` until the file system is full; return its path."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    f.write(block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def submit_all(fed: LocalFederation, round_id: str, data: np.ndarray) -> None:
    for i, x in enumerate(data):
        fed.client(f"{round_id}-c{i}").submit(round_id, x)


def test_dp_round_on_a_full_disk_fails_everywhere_with_nothing_revealed(tmp_path) -> None:
    config = write_topology(tmp_path, dp_topology_doc("fulldisk", budget_epsilon=8.0))
    topo = Topology.load(config)
    disk = tmp_path / topo.aggregator_dir(1)
    mount_tmpfs(disk, "2m")
    try:
        with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
            collector = fed.collector()
            collector.open_round("r", D)
            submit_all(fed, "r", unit_vectors(3, seed=1))
            filler = fill_disk(disk)
            with pytest.raises(RoundFailed) as failed:
                collector.aggregate("r", timeout=60)
            # Which write hits the full disk first (the close mark, the reveal mark or the
            # ledger) depends on the slack in the journal's last page: each fails closed.
            reason = failed.value.reason
            assert "aggregator 1 could not record" in reason or "aggregator(s) [1]" in reason
            assert "nothing is revealed" in reason
            # Every aggregator holds the round failed, and none of them has a result.
            for status in collector.status("r"):
                assert status["state"] == "failed"
            with pytest.raises(RoundFailed):
                collector.aggregate("r", timeout=10)
            # Aggregator 1 charged nothing (its ledger could not be written); the others
            # charged the attempt at most once, if they got as far as drawing noise.
            assert (
                not (disk / "privacy-ledger.jsonl").exists()
                or not (disk / "privacy-ledger.jsonl").read_text()
            )
            for a in (0, 2):
                ledger = tmp_path / topo.ledger_path(a)
                assert not ledger.exists() or len(ledger.read_text().splitlines()) <= 1
            # Once there is room again, the next round works without a restart.
            filler.unlink()
            data = unit_vectors(3, seed=2)
            collector.open_round("r2", D)
            submit_all(fed, "r2", data)
            result = collector.aggregate("r2", timeout=60)
            assert result.num_clients == 3 and result.epsilon == 1.0
            assert np.std(result.total - data.sum(axis=0)) > 0  # noisy, not the exact total
    finally:
        subprocess.run(["umount", "-l", str(disk)], timeout=30, check=False)


def test_a_round_id_is_refused_after_every_party_restarts(tmp_path) -> None:
    config = write_topology(tmp_path, dp_topology_doc("reuse", budget_epsilon=8.0))
    data = unit_vectors(2, seed=3)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        collector.open_round("r1", D)
        submit_all(fed, "r1", data)
        first = collector.aggregate("r1", timeout=60)
    # Every party stops and starts again: journals of ended rounds are gone by now.
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        with pytest.raises(RemoteRefusal) as refused:
            collector.open_round("r1", D)
        assert refused.value.status == 409 and refused.value.code == "round_id_used"
        assert "single-use" in refused.value.detail
        with pytest.raises(RemoteRefusal) as ended:
            collector.status("r1")
        assert ended.value.status == 410 and ended.value.code == "round_ended"
        collector.open_round("r2", D)  # a fresh id works, and is charged on top of r1
        submit_all(fed, "r2", data)
        second = collector.aggregate("r2", timeout=60)
    assert second.cumulative_epsilon > first.cumulative_epsilon
    topo = Topology.load(config)
    for i in range(3):
        lines = (tmp_path / topo.ledger_path(i)).read_text().splitlines()
        assert [line.count('"round": "r1"') for line in lines] == [1, 0]
        assert '"round": "r2"' in lines[1]
