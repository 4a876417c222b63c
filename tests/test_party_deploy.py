"""A party as an organisation runs it, as real processes: its data directory bound to the
topology, paths relative to the file that names them, a bind address apart from the
advertised host, listen failures as one line, and a federation on IPv6 loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.launcher import PARTY_COMMAND, LocalFederation
from mpc_agg.provision import LocalDeployment, provision_local
from mpc_agg.storage.binding import MARKER, Marker

from .conftest import dp_topology_doc, topology_doc, write_topology

pytestmark = pytest.mark.processes

NOT_HERE = "192.0.2.1"  # TEST-NET-1: an address of no machine


def party_command(topology: Path, party_dir: Path, *extra: str) -> list[str]:
    return [
        *PARTY_COMMAND,
        "--topology",
        str(topology),
        "--party-dir",
        str(party_dir),
        *extra,
    ]


def refused(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run a party expected to exit at once: its status and its one line of stderr."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stdout, out.stdout
    return out.returncode, lines[0]


class Party:
    """A party process whose output goes to a file."""

    def __init__(self, command: list[str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log, "w") as sink:
            self.proc = subprocess.Popen(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, words: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while words not in self.output():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {words!r} in:\n{self.output()}"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_round(deployment: LocalDeployment, round_id: str, n: int = 3) -> object:
    data = np.arange(n * 4, dtype=float).reshape(n, 4) / 100.0
    collector = deployment.collector()
    collector.open_round(round_id, 4)
    for i, x in enumerate(data):
        deployment.client(f"{round_id}-{i}").submit(round_id, x)
    return collector.aggregate(round_id, timeout=60)


def marker_of(topology: Topology, index: int) -> Marker:
    return Marker.from_json((topology.aggregator_dir(index) / MARKER).read_bytes())


def test_the_data_directory_is_bound_to_the_topology(tmp_path: Path) -> None:
    deployment = provision_local(write_topology(tmp_path, topology_doc(2, 0, name="bound")))
    topology, path = deployment.topology(), deployment.topology_path
    party_dir = deployment.party_dirs[1]
    directory = topology.aggregator_dir(1)
    command = party_command(path, party_dir)

    # No data directory: refused, and nothing created.
    status, line = refused(command, tmp_path)
    assert status == 3 and "does not exist" in line and "--new-data-dir" in line
    assert not directory.exists()

    # --new-data-dir: a loud warning, a marker; a restart needs no flag.
    party = Party([*command, "--new-data-dir"], tmp_path, tmp_path / "new.log")
    party.wait_for("HTTP API on")
    assert party.stop() == 0
    assert "WARNING" in party.output() and "new, empty privacy ledger" in party.output()
    first = marker_of(topology, 1)
    assert (first.fingerprint, first.index, first.topology) == (fingerprint(topology), 1, "bound")
    party = Party(command, tmp_path, tmp_path / "again.log")
    party.wait_for("HTTP API on")
    assert party.stop() == 0
    assert "bound to this topology since" in party.output()

    # Another topology (one setting changed): refused naming both fingerprints.
    doc = yaml.safe_load(path.read_text())
    doc["rounds"]["min_clients"] = 3
    other_path = path.parent / "other.yaml"
    other_path.write_text(yaml.safe_dump(doc))
    other = Topology.load(other_path)
    status, line = refused(party_command(other_path, party_dir), tmp_path)
    assert status == 3
    assert fingerprint(topology) in line and fingerprint(other) in line
    assert "differing sections: rounds)" in line and "--adopt-data-dir" in line

    # --adopt-data-dir rebinds it, loudly, keeping the directory.
    party = Party(
        party_command(other_path, party_dir, "--adopt-data-dir"), tmp_path, tmp_path / "re.log"
    )
    party.wait_for("HTTP API on")
    assert party.stop() == 0
    assert "REBINDING" in party.output()
    rebound = marker_of(topology, 1)
    assert (rebound.fingerprint, rebound.adopted_from) == (fingerprint(other), first.fingerprint)

    # The index: from the card; --index must agree with it.
    status, line = refused([*command, "--index", "0"], tmp_path)
    assert status == 2 and "disagrees" in line


def test_listen_failures_are_one_line_naming_the_address(tmp_path: Path) -> None:
    deployment = provision_local(write_topology(tmp_path, topology_doc(2, 0, name="nolisten")))
    topology, path = deployment.topology(), deployment.topology_path
    a1 = topology.aggregators[1]

    # A bind address not on this machine.
    command = party_command(path, deployment.party_dirs[1], "--new-data-dir")
    status, line = refused([*command, "--bind", NOT_HERE], tmp_path)
    assert status == 3 and f"HTTP API on {NOT_HERE}:{a1.http_port}" in line

    # The party-link port held by another socket: HTTP comes up, the link listener fails.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", a1.mpc_port))
        holder.listen()
        status, line = refused(command, tmp_path)
    assert status == 3 and f"party links on 127.0.0.1:{a1.mpc_port}" in line

    # An advertised host that is not on this machine.
    doc = topology_doc(2, 0, name="elsewhere")
    doc["aggregators"][1]["host"] = NOT_HERE
    (tmp_path / "far").mkdir()
    far = provision_local(write_topology(tmp_path / "far", doc))
    status, line = refused(
        party_command(far.topology_path, far.party_dirs[1], "--new-data-dir"), tmp_path
    )
    port = far.topology().aggregators[1].http_port
    assert status == 3 and f"{NOT_HERE}:{port}" in line


def listening(port: int) -> set[str]:
    """The local IPv4 addresses (hex, as in /proc/net/tcp) listening on ``port``."""
    found = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_bind_listens_apart_from_the_advertised_host(tmp_path: Path) -> None:
    deployment = provision_local(write_topology(tmp_path, topology_doc(2, 0, name="bind")))
    topology, path = deployment.topology(), deployment.topology_path
    a1 = topology.aggregators[1]
    # party.yaml names an address of no machine; --bind on the command line wins.
    (deployment.party_dirs[1] / "party.yaml").write_text(f"bind: {NOT_HERE}\n")
    command = party_command(path, deployment.party_dirs[1], "--new-data-dir")
    one = Party([*command, "--bind", "0.0.0.0"], tmp_path, tmp_path / "one.log")
    zero = None
    try:
        one.wait_for("listening on 0.0.0.0")
        deadline = time.monotonic() + 30
        while listening(a1.mpc_port) != {"00000000"}:  # the link listener, while it waits
            assert time.monotonic() < deadline, listening(a1.mpc_port)
            time.sleep(0.1)
        assert listening(a1.http_port) == {"00000000"}
        zero = Party(
            party_command(path, deployment.party_dirs[0], "--new-data-dir"),
            tmp_path,
            tmp_path / "zero.log",
        )
        result = run_round(deployment, "bound-anywhere")
        assert result.num_clients == 3  # type: ignore[attr-defined]
    finally:
        assert one.stop() == 0
        if zero is not None:
            assert zero.stop() == 0


def _ledger_lines(topology: Topology) -> list[int]:
    return [len(topology.ledger_path(i).read_text().splitlines()) for i in range(topology.m)]


def test_a_relative_data_dir_is_the_same_from_any_working_directory(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    deployment = provision_local(write_topology(keys, dp_topology_doc("rel", 10.0)))
    doc = yaml.safe_load(deployment.topology_path.read_text())
    doc["data_dir"] = "state"  # relative: to the file's directory
    conf = tmp_path / "conf"
    conf.mkdir()
    keyed = write_topology(conf, doc)
    topology = Topology.load(keyed)
    assert topology.data_dir == conf / "state"
    sink = open(os.devnull, "w")
    for n, cwd in enumerate((tmp_path / "a", tmp_path / "b" / "deeper"), start=1):
        cwd.mkdir(parents=True)
        fed = LocalFederation(keyed, cwd=cwd, output=sink, party_dirs=deployment.party_dirs)
        assert ("--new-data-dir" in fed.command(0)) == (n == 1)  # only the first time
        with fed:
            run_round(fed.deployment, f"rel-{n}")
        assert _ledger_lines(topology) == [n] * topology.m  # one ledger, charged twice
    assert (
        not (tmp_path / "a" / "state").exists()
        and not (tmp_path / "b").joinpath("deeper", "state").exists()
    )
    sink.close()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_ipv6_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET6) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("::1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_a_round_on_ipv6_loopback(tmp_path: Path) -> None:
    ports = free_ipv6_ports(6)
    doc = topology_doc(3, 1, name="six")
    doc["aggregators"] = [
        {"host": "::1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]} for i in range(3)
    ]
    config = write_topology(tmp_path, doc)
    lines: list[str] = []
    sink = _Lines(lines.append)
    with LocalFederation(config, cwd=tmp_path, output=sink) as fed:
        assert not fed.topology.insecure
        assert fed.topology.aggregators[0].url == f"https://[::1]:{ports[1]}"
        result = run_round(fed.deployment, "six")
        assert result.num_clients == 3  # type: ignore[attr-defined]
        np.testing.assert_allclose(
            result.total,  # type: ignore[attr-defined]
            (np.arange(12, dtype=float).reshape(3, 4) / 100.0).sum(axis=0),
            atol=1e-6,
        )
    assert any("HTTP API on https://[::1]:" in line for line in lines)
    assert any("new data directory" in line for line in lines)  # the launcher says so


class _Lines:
    """A text sink calling ``add`` with each line written."""

    def __init__(self, add: Callable[[str], None]) -> None:
        self.add = add

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.add(line)
        return len(text)

    def flush(self) -> None:
        pass


def test_marker_on_disk_is_the_documented_format(tmp_path: Path) -> None:
    deployment = provision_local(write_topology(tmp_path, topology_doc(2, 0, name="fmt")))
    party = Party(
        party_command(deployment.topology_path, deployment.party_dirs[0], "--new-data-dir"),
        tmp_path,
        tmp_path / "p.log",
    )
    party.wait_for("HTTP API on")
    assert party.stop() == 0
    doc = json.loads((deployment.topology().aggregator_dir(0) / MARKER).read_text())
    assert sorted(doc) == [
        "adopted_from",
        "bound_at",
        "fingerprint",
        "format",
        "index",
        "sections",
        "topology",
    ]
    assert doc["format"] == "mpc_agg/data-dir-marker/v1" and doc["index"] == 0
    assert doc["fingerprint"] == fingerprint(deployment.topology())


def test_an_insecure_topology_never_listens_beyond_loopback(tmp_path: Path) -> None:
    doc = topology_doc(2, 0, name="insecure-bind")
    doc["insecure"] = True
    deployment = provision_local(write_topology(tmp_path, doc))
    command = party_command(deployment.topology_path, deployment.party_dirs[0], "--new-data-dir")
    status, line = refused([*command, "--bind", "0.0.0.0"], tmp_path)
    assert status == 2 and "'0.0.0.0' is not a loopback address" in line
    (deployment.party_dirs[0] / "party.yaml").write_text("bind: '::'\n")
    status, line = refused(command, tmp_path)
    assert status == 2 and "'::' is not a loopback address" in line
    assert not deployment.topology().aggregator_dir(0).exists()  # refused before any state
