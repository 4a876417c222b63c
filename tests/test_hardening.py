"""Hardening with real processes on 127.0.0.1: TLS and tokens on every link, crash
recovery from the journal, a party lost during the reveal, many concurrent uploads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpc_agg import Client, Collector, RemoteRefusal, RoundFailed, UploadRefused
from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.auth import collector_token_path

from .conftest import ROOT, start_launcher, stop_launcher, topology_doc, write_topology
from .fault_party import fault_party_command

pytestmark = pytest.mark.processes


def ints(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def run_script(name: str, *args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_round_over_tls_with_tokens(tmp_path):
    doc = topology_doc(
        3,
        1,
        name="tls",
        tls={"dir": str(tmp_path / "tls")},
        auth={"secrets_dir": str(tmp_path / "secrets")},
    )
    config = write_topology(tmp_path, doc)
    run_script("make_certs.py", str(config), cwd=tmp_path)
    run_script("make_secrets.py", str(config), cwd=tmp_path)
    lines = run_script(
        "make_secrets.py", str(config), "--client", "alice", "--client", "bob", cwd=tmp_path
    ).split()
    tokens = dict(zip(lines[0::2], lines[1::2], strict=True))
    collector_token = collector_token_path(tmp_path / "secrets").read_text().strip()

    fed = start_launcher(config, cwd=tmp_path)
    try:
        topo = fed.topology
        assert all(a.url.startswith("https://") for a in topo.aggregators)
        collector = Collector(topo, token=collector_token)
        collector.open_round("r", 16)
        data = ints(3, 16, seed=1)

        # Missing and wrong credentials: 401 and 403, nothing accepted.
        with pytest.raises(UploadRefused) as missing:
            Client(topo, "alice").submit("r", data[0])
        assert (missing.value.status, missing.value.code) == (401, "unauthenticated")
        with pytest.raises(UploadRefused) as wrong:
            Client(topo, "alice", token=tokens["bob"]).submit("r", data[0])
        assert (wrong.value.status, wrong.value.code) == (403, "forbidden")
        with pytest.raises(RemoteRefusal) as no_collector:
            Collector(topo).open_round("r2", 16)
        assert no_collector.value.status == 401
        with pytest.raises(RemoteRefusal) as bad_collector:
            Collector(topo, token=tokens["alice"].split(",")[0]).aggregate("r", timeout=10)
        assert bad_collector.value.status == 403
        assert [s["accepted"] for s in collector.status("r")] == [0, 0, 0]

        Client(topo, "alice", token=tokens["alice"]).submit("r", data[0])
        Client(topo, "bob", token=tokens["bob"].split(",")).submit("r", data[1])
        result = collector.aggregate("r", timeout=60)
        assert result.num_clients == 2
        np.testing.assert_array_equal(result.total, data[0] + data[1])
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_plain_http_to_a_tls_party_fails(tmp_path):
    doc = topology_doc(2, 0, name="tlsonly", tls={"dir": str(tmp_path / "tls")})
    config = write_topology(tmp_path, doc)
    run_script("make_certs.py", str(config), cwd=tmp_path)
    fed = start_launcher(config, cwd=tmp_path)
    try:
        import urllib.error
        import urllib.request

        a = fed.topology.aggregators[0]
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{a.host}:{a.http_port}/healthz", timeout=5)
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_kill_9_and_restart_loses_nothing_and_doubles_nothing(tmp_path):
    doc = topology_doc(3, 1, name="crash")
    doc["fsync"] = True
    config = write_topology(tmp_path, doc)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        collector = Collector(topo)
        collector.open_round("r", 64)
        data = ints(10, 64, seed=2)
        clients = [Client(topo, f"c{i}") for i in range(10)]
        for i in range(5):
            clients[i].submit("r", data[i])
        os.kill(fed.pids[1], signal.SIGKILL)
        fed.processes[1].wait(timeout=10)
        fed.restart(1)  # the same command
        fed.wait_ready(30)
        assert [s["accepted"] for s in collector.status("r")] == [5, 5, 5]
        # Retries of the first uploads are recognised after the restart, not counted twice.
        for i in range(5):
            assert clients[i].submit("r", data[i]).retries == (0, 1, 2)
        for i in range(5, 10):
            clients[i].submit("r", data[i])
        result = collector.aggregate("r", timeout=60)
        assert result.num_clients == 10
        np.testing.assert_array_equal(result.total, data.sum(axis=0))


def test_torn_journal_tail_is_dropped_and_logged(tmp_path):
    doc = topology_doc(2, 0, name="torn")
    config = write_topology(tmp_path, doc)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        collector = Collector(topo)
        collector.open_round("r", 8)
        data = ints(3, 8, seed=3)
        for i in range(3):
            Client(topo, f"c{i}").submit("r", data[i])
        fed.processes[0].kill()
        fed.processes[0].wait(timeout=10)
        journal = (
            topo.aggregator_dir(0)
            if topo.data_dir.is_absolute()
            else (tmp_path / topo.aggregator_dir(0))
        )
        path = journal / "round-r.journal"
        size = path.stat().st_size
        os.truncate(path, size - 3)  # a crash in the middle of the last record
        fed.restart(0)
        fed.wait_ready(30)
        assert [s["accepted"] for s in collector.status("r")] == [2, 3]
        assert any("dropped the tail" in line for line in fed._tails[0])
        result = collector.aggregate("r", timeout=60)  # the torn client is partial: dropped
        assert (result.num_clients, result.dropped_clients) == (2, 1)
        np.testing.assert_array_equal(result.total, data[0] + data[1])


def test_party_killed_during_reveal_fails_the_round_within_its_deadline(tmp_path):
    doc = topology_doc(3, 1, name="reveal", deadlines={"step_s": 5})
    config = write_topology(tmp_path, doc)
    # Every party pauses 2 s before its readiness vote (a DelayingNetwork around its MPyC
    # network, in tests/fault_party.py): the parties have agreed, nothing is revealed yet.
    party = fault_party_command("--delay-vote-s", "2")
    log = tmp_path / "parties.log"
    with (
        log.open("w") as output,
        LocalFederation(config, cwd=tmp_path, output=output, party_command=party) as fed,
    ):
        topo = fed.topology
        collector = Collector(topo)
        collector.open_round("r", 8)
        for i, x in enumerate(ints(2, 8, seed=4)):
            Client(topo, f"c{i}").submit("r", x)

        async def close_then_kill() -> None:
            task = asyncio.ensure_future(collector.aggregate_async("r", timeout=30))
            for _ in range(400):  # until aggregator 2 holds its share and waits to vote
                lines = log.read_text().splitlines()
                if any(ln.startswith("[agg 2] ") and "delays exchange" in ln for ln in lines):
                    break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError("aggregator 2 never reached its delayed vote")
            os.kill(fed.pids[2], signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(RoundFailed, match="nothing revealed|is down"):
                await task
            assert time.monotonic() - started < 10

        asyncio.run(close_then_kill())
        # The survivors stay up; the restarted party rejoins and later rounds work.
        fed.restart(2)
        fed.wait_ready(30)
        collector.open_round("r2", 8)
        data = ints(2, 8, seed=5)
        for i, x in enumerate(data):
            Client(topo, f"d{i}").submit("r2", x)
        np.testing.assert_array_equal(collector.aggregate("r2", timeout=60).total, data.sum(0))


def test_500_concurrent_small_uploads_are_accepted_exactly_once(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 4, min_clients=2)
    data = ints(500, 4, seed=6)

    async def upload_all() -> list:
        clients = [Client(topo, f"u{i}", retries=5) for i in range(500)]
        first = await asyncio.gather(
            *(c.submit_async(round_id, x) for c, x in zip(clients, data, strict=True))
        )
        again = await asyncio.gather(
            *(c.submit_async(round_id, x) for c, x in zip(clients[:50], data[:50], strict=True))
        )
        return [first, again]

    first, again = asyncio.run(upload_all())
    assert all(r.retries == () for r in first)
    assert all(r.retries == (0, 1, 2) for r in again)
    assert [s["accepted"] for s in collector.status(round_id)] == [500, 500, 500]
    result = collector.aggregate(round_id, timeout=120)
    assert result.num_clients == 500
    np.testing.assert_array_equal(result.total, data.sum(axis=0))


def test_party_link_with_another_partys_certificate_is_refused(tmp_path):
    import socket
    import ssl

    from mpc_agg.transport import tls

    doc = topology_doc(3, 1, name="spoof", tls={"dir": str(tmp_path / "tls")})
    config = write_topology(tmp_path, doc)
    run_script("make_certs.py", str(config), cwd=tmp_path)
    # Only party 2 runs: it listens for parties 0 and 1.
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "mpc_agg.party", "--config", str(config), "--index", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = doc["aggregators"][2]["mpc_port"]
        crt, key = tls.party_cert_paths(tmp_path / "tls", 0)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.load_cert_chain(crt, key)
        ctx.load_verify_locations(tls.mpyc_ca_path(tmp_path / "tls"))
        deadline = time.monotonic() + 30
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with ctx.wrap_socket(raw, server_hostname="MPyC party 2") as conn:
            conn.settimeout(10)
            conn.sendall((1).to_bytes(2, "little") + bytes(64))  # party 0's cert, claims 1
            assert conn.recv(1) == b""  # the listener hangs up
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert "certificate ['MPyC party 0'] claims to be party 1" in out


def test_slow_upload_times_out_and_extra_uploads_get_busy(tmp_path):
    import json
    import socket
    import urllib.error
    import urllib.request

    doc = topology_doc(2, 0, name="slow", deadlines={"upload_s": 2})
    doc["rounds"]["max_concurrent_uploads"] = 1
    config = write_topology(tmp_path, doc)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        Collector(topo).open_round("r", 4)
        a = topo.aggregators[0]
        body = Client(topo, "fast").prepare("r", np.ones(4))[0]
        # A slow client announces its body and sends 3 bytes: it holds the one upload slot.
        slow = socket.create_connection((a.host, a.http_port), timeout=10)
        slow.sendall(
            b"PUT /v1/rounds/r/shares/slow HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\nMPA" % len(body)
        )
        time.sleep(0.5)
        req = urllib.request.Request(f"{a.url}/v1/rounds/r/shares/fast", data=body, method="PUT")
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(req, timeout=10)
        assert busy.value.code == 503
        assert json.loads(busy.value.read())["error"] == "busy"
        answer = slow.recv(4096).decode()  # after upload_s = 2 s
        slow.close()
        assert answer.startswith("HTTP/1.1 408") and '"timeout"' in answer
        with urllib.request.urlopen(req, timeout=10) as ok:  # the slot is free again
            assert ok.status == 201
