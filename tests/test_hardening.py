"""Hardening with real processes on 127.0.0.1: HTTPS pinned to each aggregator's
certificate and tokens on every request, party links that check a peer's certificate against
the index it claims, crash recovery from the journal, a party lost during the reveal, many
concurrent uploads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from mpc_agg import Client, Collector, RemoteRefusal, RoundFailed, UploadRefused
from mpc_agg.identity import PARTY_LINK_CERT, PARTY_LINK_KEY
from mpc_agg.launcher import LocalFederation
from mpc_agg.provision import provision_local
from mpc_agg.transport.tls import https_client_context, party_client_context

from .conftest import start_launcher, stop_launcher, topology_doc, write_topology
from .fault_party import fault_party_command

pytestmark = pytest.mark.processes


def ints(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def test_round_over_https_with_tokens(tmp_path):
    config = write_topology(tmp_path, topology_doc(3, 1, name="tokens"))
    fed = start_launcher(config, cwd=tmp_path)  # provisions keys and tokens itself
    try:
        topo = fed.topology
        assert not topo.insecure and topo.has_keys
        assert all(a.url.startswith("https://") for a in topo.aggregators)
        alice = fed.deployment.client_tokens("alice")
        bob = fed.deployment.client_tokens("bob")
        assert len(set(alice)) == 3 and not set(alice) & set(bob)  # per aggregator, per client
        collector = fed.collector()
        collector.open_round("r", 16)
        data = ints(4, 16, seed=1)

        # Missing and wrong credentials: 401 and 403, nothing accepted.
        with pytest.raises(UploadRefused) as missing:
            Client(topo, "alice").submit("r", data[0])
        assert (missing.value.status, missing.value.code) == (401, "unauthenticated")
        assert missing.value.accepted == ()
        with pytest.raises(UploadRefused) as wrong:
            Client(topo, "alice", token=bob).submit("r", data[0])
        assert (wrong.value.status, wrong.value.code) == (403, "forbidden")
        assert wrong.value.accepted == ()
        with pytest.raises(RemoteRefusal) as no_collector:
            Collector(topo).open_round("r2", 16)
        assert (no_collector.value.status, no_collector.value.code) == (401, "unauthenticated")
        with pytest.raises(RemoteRefusal) as bad_collector:
            Collector(topo, token=alice).aggregate("r", timeout=10)
        assert (bad_collector.value.status, bad_collector.value.code) == (403, "forbidden")
        assert [s["accepted"] for s in collector.status("r")] == [0, 0, 0]

        # A token is good at the one aggregator that issued it: carol's token of aggregator
        # 0 is refused by the others, so carol is a partial client (dropped).
        carol = fed.deployment.client_tokens("carol")
        with pytest.raises(UploadRefused) as elsewhere:
            Client(topo, "carol", token=carol[0]).submit("r", data[2])
        assert (elsewhere.value.status, elsewhere.value.code) == (403, "forbidden")
        assert elsewhere.value.accepted == (0,)

        Client(topo, "alice", token=alice).submit("r", data[0])
        Client(topo, "bob", token=",".join(bob)).submit("r", data[1])  # the printed form
        result = collector.aggregate("r", timeout=60)
        assert (result.num_clients, result.dropped_clients) == (2, 1)
        np.testing.assert_array_equal(result.total, data[0] + data[1])
        assert len(result.statements) == 3  # every aggregator signed the total

        # The raw API: the collector's token opens rounds and reads health; a client's
        # token does not; /v1/topology is public.
        a = topo.aggregators[1]
        collector_token = fed.deployment.collector_tokens()[1]

        def get(path: str, token: str | None) -> int:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            req = urllib.request.Request(a.url + path, headers=headers)
            try:
                with urllib.request.urlopen(
                    req, timeout=10, context=https_client_context(a)
                ) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert get("/healthz", collector_token) == 200
        assert get("/healthz", None) == 401
        assert get("/healthz", alice[1]) == 403
        flipped = collector_token[:-1] + ("1" if collector_token[-1] == "0" else "0")
        assert get("/healthz", flipped) == 403
        assert get("/v1/rounds/r", alice[1]) == 403
        assert get("/v1/topology", None) == 200
    finally:
        stop_launcher(fed.launcher, fed.party_pids)


def test_plain_http_or_an_unpinned_certificate_cannot_reach_the_api(tmp_path):
    config = write_topology(tmp_path, topology_doc(2, 0, name="httpsonly"))
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        a, other = fed.topology.aggregators
        # Plain HTTP to the HTTPS port: the TLS server hangs up.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{a.host}:{a.http_port}/v1/topology", timeout=5)
        # HTTPS trusting the system CAs, or another aggregator's pinned certificate: the
        # certificate is refused.
        for context in (ssl.create_default_context(), https_client_context(other)):
            with pytest.raises(urllib.error.URLError) as refused:
                urllib.request.urlopen(f"{a.url}/v1/topology", timeout=5, context=context)
            assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        # Pinned to its own certificate, it answers.
        with urllib.request.urlopen(
            f"{a.url}/v1/topology", timeout=5, context=https_client_context(a)
        ) as resp:
            assert json.loads(resp.read())["aggregator"] == 0


def test_kill_9_and_restart_loses_nothing_and_doubles_nothing(tmp_path):
    doc = topology_doc(3, 1, name="crash")
    doc["fsync"] = True
    config = write_topology(tmp_path, doc)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        collector = fed.collector()
        collector.open_round("r", 64)
        data = ints(10, 64, seed=2)
        clients = [fed.client(f"c{i}") for i in range(10)]
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
        collector = fed.collector()
        collector.open_round("r", 8)
        data = ints(3, 8, seed=3)
        for i in range(3):
            fed.client(f"c{i}").submit("r", data[i])
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
        collector = fed.collector()
        collector.open_round("r", 8)
        for i, x in enumerate(ints(2, 8, seed=4)):
            fed.client(f"c{i}").submit("r", x)

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
            fed.client(f"d{i}").submit("r2", x)
        np.testing.assert_array_equal(collector.aggregate("r2", timeout=60).total, data.sum(0))


def test_500_concurrent_small_uploads_are_accepted_exactly_once(federation3, round_id):
    collector = federation3.collector()
    collector.open_round(round_id, 4, min_clients=2)
    data = ints(500, 4, seed=6)
    clients = [federation3.client(f"u{i}", retries=5) for i in range(500)]

    async def upload_all() -> list:
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
    doc = topology_doc(3, 1, name="spoof")
    config = write_topology(tmp_path, doc)
    deployment = provision_local(config, cwd=tmp_path)
    topo = deployment.topology()
    # Only party 2 runs: it listens for parties 0 and 1 and accepts exactly their pinned
    # certificates.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "mpc_agg.party",
            "--config",
            str(deployment.topology_path),
            "--index",
            "2",
            "--party-dir",
            str(deployment.party_dirs[2]),
            "--new-data-dir",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Party 0's own certificate and key, dialling party 2 as party 0 would.
        party0 = deployment.party_dirs[0]
        context = party_client_context(
            (party0 / PARTY_LINK_CERT, party0 / PARTY_LINK_KEY), str(topo.aggregators[2].party_cert)
        )
        port = topo.aggregators[2].mpc_port
        deadline = time.monotonic() + 30
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with context.wrap_socket(raw) as conn:
            conn.settimeout(10)
            conn.sendall((1).to_bytes(2, "little") + bytes(64))  # party 0's cert, claims 1
            try:
                answer = conn.recv(1)
            except (ssl.SSLError, ConnectionError):
                answer = b""
            assert answer == b""  # the listener hangs up
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert (
        "the peer claims to be aggregator 1 but does not present the certificate the topology "
        "pins for it (it presents that of aggregator 0)" in out
    ), out


def test_slow_upload_times_out_and_extra_uploads_get_busy(tmp_path):
    doc = topology_doc(2, 0, name="slow", deadlines={"upload_s": 2})
    doc["rounds"]["max_concurrent_uploads"] = 1
    config = write_topology(tmp_path, doc)
    with LocalFederation(config, cwd=tmp_path, output=open(os.devnull, "w")) as fed:
        topo = fed.topology
        fed.collector().open_round("r", 4)
        a = topo.aggregators[0]
        context = https_client_context(a)
        assert context is not None
        body = fed.client("fast").prepare("r", np.ones(4))[0]
        slow_body = fed.client("slow").prepare("r", np.ones(4))[0]
        slow_token = fed.deployment.client_tokens("slow")[0]
        # A slow client announces its body and sends 3 bytes: it holds the one upload slot.
        slow = context.wrap_socket(
            socket.create_connection((a.host, a.http_port), timeout=10), server_hostname=a.host
        )
        slow.sendall(
            b"PUT /v1/rounds/r/shares/slow HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\nMPA" % (slow_token.encode(), len(slow_body))
        )
        time.sleep(0.5)
        req = urllib.request.Request(
            f"{a.url}/v1/rounds/r/shares/fast",
            data=body,
            method="PUT",
            headers={"Authorization": f"Bearer {fed.deployment.client_tokens('fast')[0]}"},
        )
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(req, timeout=10, context=context)
        assert busy.value.code == 503
        assert json.loads(busy.value.read())["error"] == "busy"
        answer = slow.recv(4096).decode()  # after upload_s = 2 s
        slow.close()
        assert answer.startswith("HTTP/1.1 408") and '"timeout"' in answer
        with urllib.request.urlopen(req, timeout=10, context=context) as ok:  # slot free again
            assert ok.status == 201
