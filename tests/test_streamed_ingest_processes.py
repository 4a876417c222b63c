"""Streamed ingest among three real aggregator processes (docs/design.md, "Streamed
uploads"), started by the launcher users run with a small streaming threshold
(``--stream-above-mb 1``, so d = 300,000 in GF(p), 2.4 MB full shares, is a large round):
full shares sent as raw HTTPS PUTs of bodies built by :meth:`mpc_agg.Client.prepare`, an
aggregator killed with SIGKILL mid-upload after it accepted streamed shares and restarted,
and the round then revealing the exact total with a partial client subtracted."""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mpc_agg.core.sharing import full_share_index
from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.tls import https_client_context

from .conftest import topology_doc, write_topology

pytestmark = pytest.mark.processes

D = 300_000


def clients_with_full_share_at(index: int, count: int, prefix: str) -> list[str]:
    ids = (f"{prefix}{k}" for k in range(1000))
    return [c for c in ids if full_share_index(c, 3) == index][:count]


class Uploader:
    """Raw HTTPS PUTs of upload bodies to the federation's aggregators, with the client's
    token of each (what a client sends, without the client library's retries)."""

    def __init__(self, fed: LocalFederation) -> None:
        self.fed = fed
        self.topology = fed.topology

    def connect(self, index: int) -> http.client.HTTPSConnection:
        a = self.topology.aggregators[index]
        return http.client.HTTPSConnection(
            a.host, a.http_port, context=https_client_context(a), timeout=120
        )

    def headers(self, index: int, client_id: str, length: int) -> dict[str, str]:
        token = self.fed.deployment.client_tokens(client_id)[index]
        return {
            "Authorization": f"Bearer {token}",
            "Content-Length": str(length),
            "Content-Type": "application/octet-stream",
        }

    def put(self, index: int, round_id: str, client_id: str, body: bytes | bytearray) -> int:
        conn = self.connect(index)
        try:
            conn.request(
                "PUT",
                f"/v1/rounds/{round_id}/shares/{client_id}",
                body=bytes(body),
                headers=self.headers(index, client_id, len(body)),
            )
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


def data_dir(fed: LocalFederation, tmp_path: Path, index: int) -> Path:
    directory = fed.topology.aggregator_dir(index)
    return directory if directory.is_absolute() else tmp_path / directory


def test_streamed_shares_survive_kill_9_mid_upload_and_the_round_reveals_exactly(
    tmp_path,
) -> None:
    doc = topology_doc(3, 1, name="streamed3")
    doc["fsync"] = True
    config = write_topology(tmp_path, doc)
    rng = np.random.default_rng(15)
    xs = rng.integers(-1000 * 2**24, 1000 * 2**24 + 1, size=(6, D)) / 2.0**24
    log = tmp_path / "parties.log"
    with (
        log.open("w") as output,
        LocalFederation(config, cwd=tmp_path, output=output, stream_above_mb=1.0) as fed,
    ):
        collector = fed.collector()
        collector.open_round("r", D)
        up = Uploader(fed)
        # Two complete clients whose full shares are streamed into aggregator 1, one into 0.
        done = clients_with_full_share_at(1, 2, "early") + clients_with_full_share_at(0, 1, "early")
        bodies = {cid: fed.client(cid).prepare("r", xs[k]) for k, cid in enumerate(done)}
        for cid in done:
            assert [up.put(i, "r", cid, bodies[cid][i]) for i in range(3)] == [201] * 3
            assert len(bodies[cid][full_share_index(cid, 3)]) == 12 + 8 * D  # large
        spool = data_dir(fed, tmp_path, 1) / "round-r.spool"
        assert len(list(spool.glob("*.body"))) == 2

        # Aggregator 1 is killed in the middle of a streamed upload.
        (victim,) = clients_with_full_share_at(1, 1, "victim")
        victim_bodies = fed.client(victim).prepare("r", xs[3])
        body = bytes(victim_bodies[1])
        conn = up.connect(1)
        conn.putrequest("PUT", f"/v1/rounds/r/shares/{victim}")
        for key, value in up.headers(1, victim, len(body)).items():
            conn.putheader(key, value)
        conn.endheaders()
        conn.send(body[: len(body) // 2])
        deadline = time.monotonic() + 60
        while not list(spool.glob(f"{victim}-*.body")):  # its spool file is being written
            assert time.monotonic() < deadline, "the upload never reached the spool"
            time.sleep(0.05)
        os.kill(fed.pids[1], signal.SIGKILL)
        fed.processes[1].wait(timeout=30)
        conn.close()
        fed.restart(1)
        fed.wait_ready(60)

        # The cut upload left nothing; the accepted streamed shares came back from the spool.
        assert not list(spool.glob(f"{victim}-*.body"))
        assert len(list(spool.glob("*.body"))) == 2
        assert [s["accepted"] for s in collector.status("r")] == [3, 3, 3]
        for cid in done:  # retries are recognised after the restart: digested, 200
            assert up.put(1, "r", cid, bodies[cid][1]) == 200
        assert [up.put(i, "r", victim, victim_bodies[i]) for i in range(3)] == [201] * 3

        # A partial client: its streamed full share and one seed share, not the other.
        (partial,) = clients_with_full_share_at(2, 1, "partial")
        partial_bodies = fed.client(partial).prepare("r", xs[4])
        assert up.put(2, "r", partial, partial_bodies[2]) == 201
        assert up.put(0, "r", partial, partial_bodies[0]) == 201

        result = collector.aggregate("r", timeout=180)
    assert (result.num_clients, result.dropped_clients) == (4, 1)
    np.testing.assert_array_equal(result.total, xs[:4].sum(axis=0))
    assert not spool.exists()  # the spool goes with the round
    text = log.read_text()
    assert "recovered from its journal: 3 clients" in text
