"""Shared fixtures: topology files on free loopback ports, and real local federations.

A federation fixture runs ``scripts/launch_local.py`` (the launcher users run) as a
subprocess, waits for its "ready" line, and on teardown sends SIGTERM and checks that every
aggregator process it started is gone.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import mpc_agg
from mpc_agg import Topology
from mpc_agg.launcher import free_loopback_ports
from mpc_agg.provision import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "scripts" / "launch_local.py"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    return free_loopback_ports(n)


def topology_doc(m: int, threshold: int, name: str = "test", **extra: object) -> dict:
    """A topology document for ``m`` aggregators on free loopback ports."""
    ports = free_ports(2 * m)
    doc: dict = {
        "name": name,
        "threshold": threshold,
        "aggregators": [
            {"host": "127.0.0.1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]}
            for i in range(m)
        ],
        "rounds": {"min_clients": 2, "max_clients": 1000, "max_dim": 1_000_000},
        "encoding": {"frac_bits": 24, "coord_clip": 1000.0, "l2_clip": None},
        "data_dir": "data",
        "fsync": False,
    }
    doc.update(extra)
    return doc


def dp_topology_doc(name: str, budget_epsilon: float) -> dict:
    """A 3-party topology with Skellam noise (epsilon 1 per round, L2 clip 1) and a budget."""
    doc = topology_doc(3, 1, name=name)
    doc["encoding"] = {"frac_bits": 16, "coord_clip": None}
    doc["dp"] = {
        "mechanism": "discrete_gaussian",
        "epsilon": 1.0,
        "delta": 1e-5,
        "l2_clip": 1.0,
        "max_colluding": 1,
        "budget": {"epsilon": budget_epsilon, "delta": 1e-4},
    }
    return doc


def write_topology(directory: Path, doc: dict) -> Path:
    path = directory / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class RunningFederation:
    """A launcher subprocess and the (provisioned) topology it serves."""

    topology: Topology
    config: Path
    launcher: subprocess.Popen[str]
    party_pids: list[int]
    lines: list[str]
    deployment: LocalDeployment

    def client(self, client_id: str, **kwargs: object) -> mpc_agg.Client:
        """A client with its tokens for this federation."""
        return self.deployment.client(client_id, **kwargs)

    def collector(self, **kwargs: object) -> mpc_agg.Collector:
        """The collector with its tokens for this federation."""
        return self.deployment.collector(**kwargs)


def start_launcher(config: Path, cwd: Path, timeout_s: float = 60.0) -> RunningFederation:
    """Run the launcher on ``config`` and wait (bounded) for its ready line."""
    proc = subprocess.Popen(
        [sys.executable, "-u", str(LAUNCHER), str(config), "--log-level", "info"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    ready: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                ready.put(line)
        ready.put("")  # EOF

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = ready.get(timeout=timeout_s)
    except queue.Empty:
        stop_launcher(proc, [])
        raise RuntimeError("launcher not ready in time:\n" + "".join(lines[-40:])) from None
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError(f"launcher exited ({proc.returncode}):\n" + "".join(lines[-40:]))
    pids = [int(p) for p in re.search(r"pids \[([\d, ]+)\]", line).group(1).split(",")]
    provisioned = Path(re.search(r"topology (\S+)$", line.strip()).group(1))
    deployment = LocalDeployment.open(provisioned.parent)
    return RunningFederation(deployment.topology(), provisioned, proc, pids, lines, deployment)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_launcher(proc: subprocess.Popen[str], party_pids: list[int]) -> None:
    """SIGTERM the launcher; kill it (and any party left) if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in party_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in party_pids:
        if pid_alive(p):
            os.kill(p, signal.SIGKILL)


def _federation(
    factory: pytest.TempPathFactory, m: int, threshold: int
) -> Iterator[RunningFederation]:
    name = f"fed{m}"
    d = factory.mktemp(name)
    fed = start_launcher(write_topology(d, topology_doc(m, threshold, name=name)), cwd=d)
    yield fed
    stop_launcher(fed.launcher, fed.party_pids)


@pytest.fixture(scope="session")
def federation3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFederation]:
    """Three real aggregator processes (threshold 1) on loopback, for the whole session."""
    yield from _federation(tmp_path_factory, 3, 1)


@pytest.fixture(scope="session")
def federation2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFederation]:
    """Two real aggregator processes (threshold 0), additive path only."""
    yield from _federation(tmp_path_factory, 2, 0)


_round_counter = iter(range(10**6))


@pytest.fixture
def round_id(request: pytest.FixtureRequest) -> str:
    """A round id unique within the session, named after the test."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:80].strip("-")
    return f"{name}-{next(_round_counter)}"
