"""Nobody but the configured parties (README, "Security model"), against real processes.

* a stranger on a party port, at start-up and while a restarted party waits for its
  peers, cannot make a party run anything, and the real parties still link;
* a configured party that sends a malicious pickle runs nothing anywhere: its links are
  dropped, the round fails with nothing revealed, and the next round works;
* parties holding different topology files refuse to link (naming the section), and a
  client or collector with another file is refused with a typed error;
* a leader whose HTTP answer is altered is caught by the signed statements;
* a launch onto ports that another federation holds fails, naming the port.

Every process is started by a :class:`~mpc_agg.launcher.LocalFederation` or by this module
and stopped by its pid.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from mpc_agg import Client, Collector, RoundFailed, Topology
from mpc_agg.core.statement import ResultMismatch
from mpc_agg.errors import TopologyMismatchError
from mpc_agg.launcher import PARTY_COMMAND, LaunchError, LocalFederation
from mpc_agg.transport.tls import https_client_context

from .conftest import topology_doc, write_topology

pytestmark = pytest.mark.processes

EVIL_PARTY = [sys.executable, "-u", str(Path(__file__).resolve().parent / "evil_party.py")]


class Touch:
    """A pickle that creates ``path`` when a party unpickles it with :mod:`pickle`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.path}",))


def poison_frame(marker: Path, claimed_pid: int = 0) -> bytes:
    """What the old attack sent on a plaintext party link: a party number, PRSS key bytes,
    then an MPyC message (program counter, length, payload) holding the pickle."""
    payload = pickle.dumps(Touch(marker))
    return (
        claimed_pid.to_bytes(2, "little")
        + os.urandom(16)
        + np.int64(1).tobytes()
        + len(payload).to_bytes(4, "little")
        + payload
    )


def attack_party_port(port: int, marker: Path, deadline_s: float = 20.0) -> int:
    """Connect to 127.0.0.1:``port`` as a stranger until it accepts, and send the poison in
    plaintext and over TLS with a certificate of our own; returns how many connections the
    port accepted."""
    accepted = 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and accepted < 2:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                accepted += 1
                sock.sendall(poison_frame(marker))
                sock.settimeout(2)
                try:
                    sock.recv(100)
                except OSError:
                    pass
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                try:
                    with context.wrap_socket(raw) as tls:
                        tls.sendall(poison_frame(marker))
                except (ssl.SSLError, OSError):
                    pass
        except OSError:
            time.sleep(0.05)
    return accepted


def kill(fed: LocalFederation, index: int) -> None:
    os.kill(fed.pids[index], signal.SIGKILL)
    fed.processes[index].wait(timeout=10)


def run_round(fed: LocalFederation, round_id: str, n: int = 3, dim: int = 16) -> object:
    data = np.random.default_rng(len(round_id)).integers(-50, 51, size=(n, dim)).astype(float)
    collector = fed.collector()
    collector.open_round(round_id, dim)
    for i, x in enumerate(data):
        fed.client(f"{round_id}-c{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    assert np.array_equal(result.total, data.sum(axis=0))
    assert len(result.statements) == fed.topology.m
    return result


def test_a_stranger_on_a_party_port_runs_nothing_at_start_and_after_a_restart(tmp_path):
    config = write_topology(tmp_path, topology_doc(3, 1, name="stranger"))
    marker = tmp_path / "pwned"
    with open(os.devnull, "w") as sink:
        fed = LocalFederation(config, cwd=tmp_path, output=sink)
        try:
            # Start-up: while the leader is not there, the followers listen for it.
            fed.start()
            kill(fed, 0)
            assert attack_party_port(fed.topology.aggregators[2].mpc_port, marker) >= 1
            fed.restart(0)
            fed.wait_ready()
            run_round(fed, "after-start")

            # A restarted party listens for the leader until its links are up.
            kill(fed, 0)
            kill(fed, 1)
            fed.restart(1)
            assert attack_party_port(fed.topology.aggregators[1].mpc_port, marker) >= 1
            fed.restart(0)
            fed.wait_ready()
            run_round(fed, "after-restart")
        finally:
            fed.stop()
    assert not marker.exists()


def test_a_configured_party_sending_a_malicious_pickle_runs_nothing(tmp_path):
    config = write_topology(tmp_path, topology_doc(3, 1, name="pickle"))
    marker = tmp_path / "pwned"
    command = [*EVIL_PARTY, "--attacker", "1", "--poison-once", str(marker)]
    with (
        open(os.devnull, "w") as sink,
        LocalFederation(config, cwd=tmp_path, output=sink, party_command=command) as fed,
    ):
        collector = fed.collector()
        collector.open_round("poisoned", 8)
        for i in range(3):
            fed.client(f"p{i}").submit("poisoned", np.ones(8))
        with pytest.raises(RoundFailed) as failed:
            collector.aggregate("poisoned", timeout=60)
        assert failed.value.code == "party_lost"
        fed.wait_ready(timeout_s=60)  # the parties reconnect
        run_round(fed, "after-poison")
    assert not marker.exists()


def _party(config: Path, index: int, party_dir: Path, cwd: Path) -> subprocess.Popen[bytes]:
    command = [
        *PARTY_COMMAND,
        "--config",
        str(config),
        "--index",
        str(index),
        "--party-dir",
        str(party_dir),
        "--log-level",
        "info",
        "--new-data-dir",  # or a marked directory of its own topology
    ]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _health(topology: Topology, index: int, token: str) -> dict:
    address = topology.aggregators[index]
    request = urllib.request.Request(
        address.url + "/healthz", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(
        request, timeout=2, context=https_client_context(address)
    ) as answer:
        return json.loads(answer.read())


def test_parties_with_different_topology_files_refuse_to_link(tmp_path):
    config = write_topology(tmp_path, topology_doc(3, 1, name="twins"))
    fed = LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w"))
    deployment = fed.deployment
    other_doc = yaml.safe_load(deployment.topology_path.read_text())
    other_doc["encoding"]["frac_bits"] = 20
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(other_doc))
    tokens = deployment.collector_tokens()
    procs = [
        _party(deployment.topology_path if i < 2 else other, i, deployment.party_dirs[i], tmp_path)
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 60
        states: dict[int, dict] = {}
        while time.monotonic() < deadline:
            try:
                states = {i: _health(fed.topology, i, tokens[i]) for i in range(3)}
            except OSError:
                time.sleep(0.2)
                continue
            if all(s["mpc"] == "topology_mismatch" for s in states.values()):
                break
            time.sleep(0.2)
        assert all(s["mpc"] == "topology_mismatch" for s in states.values()), states
        assert "encoding" in states[2]["detail"] and "aggregator 0" in states[2]["detail"]
        assert "encoding" in states[0]["detail"]
        assert states[2]["fingerprint"] != states[0]["fingerprint"]
        assert all(p.poll() is None for p in procs)  # refusing, not crashing

        # A collector or client holding the other file is refused before anything happens.
        stranger = Topology.load(other)
        with pytest.raises(TopologyMismatchError) as refused:
            Collector(stranger, tokens).open_round("r", 4)
        assert refused.value.aggregator in (0, 1) and refused.value.status == 409
        alice = Client(stranger, "alice", deployment.client_tokens("alice"))
        with pytest.raises(TopologyMismatchError):
            alice.submit("r", np.ones(4))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_an_altered_leader_answer_is_detected_by_the_signed_statements(tmp_path):
    config = write_topology(tmp_path, topology_doc(3, 1, name="forged"))
    command = [*EVIL_PARTY, "--attacker", "0", "--tamper-result"]
    with (
        open(os.devnull, "w") as sink,
        LocalFederation(config, cwd=tmp_path, output=sink, party_command=command) as fed,
    ):
        collector = fed.collector()
        collector.open_round("forged", 4)
        for i in range(3):
            fed.client(f"f{i}").submit("forged", np.arange(4.0))
        with pytest.raises(ResultMismatch) as caught:
            collector.aggregate("forged", timeout=60)
        assert "total_digest" in caught.value.fields
        assert "total" in str(caught.value)


def test_a_launch_onto_taken_ports_fails_naming_the_port(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    doc = topology_doc(2, 0, name="taken")
    with (
        open(os.devnull, "w") as sink,
        LocalFederation(write_topology(first, doc), cwd=first, output=sink) as running,
    ):
        # Another federation of the same template (its own keys) on the same ports.
        with pytest.raises(LaunchError) as failed:
            with LocalFederation(write_topology(second, doc), cwd=second, output=sink):
                pass
        ports = [str(a.http_port) for a in running.topology.aggregators] + [
            str(a.mpc_port) for a in running.topology.aggregators
        ]
        assert any(port in str(failed.value) for port in ports), str(failed.value)
        # The same federation launched twice (same keys): the answering process is not ours.
        with pytest.raises(LaunchError) as again:
            with LocalFederation(write_topology(first, doc), cwd=first, output=sink):
                pass
        assert any(port in str(again.value) for port in ports), str(again.value)
        run_round(running, "still-fine", n=2)
