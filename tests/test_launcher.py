"""The launcher and party entry programs as users run them: ready line, clean stop, no
orphans, clear errors for bad configs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, pid_alive, start_launcher, stop_launcher, topology_doc, write_topology

pytestmark = pytest.mark.processes


def wait_gone(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_sigterm_stops_every_party(tmp_path):
    fed = start_launcher(write_topology(tmp_path, topology_doc(3, 1, name="stopme")), cwd=tmp_path)
    try:
        assert len(fed.party_pids) == 3
        assert all(pid_alive(p) for p in fed.party_pids)
        fed.launcher.send_signal(signal.SIGTERM)
        assert fed.launcher.wait(timeout=30) == 0
        assert wait_gone(fed.party_pids) == []
        assert any("stopping 3 aggregators" in line for line in fed.lines)
        assert any(line.startswith("[agg 2] ") for line in fed.lines)
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_a_dying_party_stops_the_rest(tmp_path):
    fed = start_launcher(write_topology(tmp_path, topology_doc(2, 0, name="dies")), cwd=tmp_path)
    try:
        os.kill(fed.party_pids[1], signal.SIGKILL)
        assert fed.launcher.wait(timeout=30) == 1
        assert wait_gone(fed.party_pids) == []
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_launcher_refuses_bad_config(tmp_path):
    doc = topology_doc(2, 1, name="bad")  # 2t >= m
    path = write_topology(tmp_path, doc)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "launch_local.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "threshold" in out.stderr and "2t < m" in out.stderr


def test_party_cli_help_and_bad_index(tmp_path):
    party_command = [sys.executable, "-m", "mpc_agg", "party"]
    out = subprocess.run([*party_command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert all(opt in out.stdout for opt in ("--config", "--index", "--party-dir"))
    path = write_topology(tmp_path, topology_doc(2, 0, name="idx"))

    def party(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*party_command, "--config", str(path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    out = party("--index", "5", "--party-dir", str(tmp_path / "party-5"))
    assert out.returncode == 2
    assert "--index must be in 0..1" in out.stderr
    out = party("--index", "0")  # a party cannot start without its own keys
    assert out.returncode == 2
    assert "--party-dir" in out.stderr
    out = party("--index", "0", "--party-dir", str(tmp_path / "party-0"))
    assert out.returncode == 2
    assert "template" in out.stderr  # no keys in the topology: the launcher provisions them


def test_importing_mpc_agg_does_not_import_mpyc():
    code = "import sys, mpc_agg, mpc_agg.aggregator, mpc_agg.launcher; print('mpyc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_parties_do_not_outlive_a_killed_launcher(tmp_path):
    fed = start_launcher(write_topology(tmp_path, topology_doc(2, 0, name="orphans")), cwd=tmp_path)
    try:
        fed.launcher.kill()  # SIGKILL: the launcher cannot clean up itself
        fed.launcher.wait(timeout=10)
        assert wait_gone(fed.party_pids) == []
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_lost_party_is_reported_and_a_restarted_party_rejoins(tmp_path):
    import json as _json
    import urllib.request

    import numpy as np

    from mpc_agg import AggregationTimeout, RoundFailed
    from mpc_agg.launcher import LocalFederation
    from mpc_agg.transport.tls import https_client_context

    config = write_topology(tmp_path, topology_doc(3, 1, name="rejoin"))
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        tokens = fed.deployment.collector_tokens()

        def request(index: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
            """One HTTPS request to aggregator ``index`` with the collector's token."""
            a = topo.aggregators[index]
            req = urllib.request.Request(
                a.url + path,
                data=body,
                method="GET" if body is None else "PUT",
                headers={"Authorization": f"Bearer {tokens[index]}"},
            )
            with urllib.request.urlopen(req, timeout=5, context=https_client_context(a)) as resp:
                return resp.status, resp.read()

        def health(index: int) -> str:
            return _json.loads(request(index, "/healthz")[1])["mpc"]

        fed.processes[2].kill()
        fed.processes[2].wait(timeout=10)
        deadline = time.monotonic() + 15
        while health(0) != "connecting" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert health(0) == "connecting"
        for i in (0, 1):
            assert request(i, "/v1/rounds/r", b'{"dim": 4}')[0] == 201
        collector = fed.collector()
        with pytest.raises(AggregationTimeout, match=r"waiting for aggregator\(s\) \[2\]"):
            collector.aggregate("r", timeout=2)
        assert fed.processes[0].poll() is None and fed.processes[1].poll() is None

        fed.restart(2)  # the same command; the others reconnect to it
        fed.wait_ready(30)
        with pytest.raises(RoundFailed, match="unknown at aggregator 2"):
            collector.aggregate("r", timeout=30)
        collector.open_round("r2", 4)
        data = np.array([[1.0, 2, 3, 4], [5, 6, 7, 8]])
        for i, x in enumerate(data):
            fed.client(f"c{i}").submit("r2", x)
        np.testing.assert_array_equal(collector.aggregate("r2", timeout=30).total, data.sum(0))
