"""Real aggregator processes on 127.0.0.1 (started by scripts/launch_local.py), real HTTP
clients, MPyC between the parties. Each test uses its own round on the shared federation, so
each also checks that other rounds' activity does not disturb it."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest

from mpc_agg import Client, Collector, RoundFailed, UploadRefused
from mpc_agg.core.codec import SHARE_HEADER
from mpc_agg.core.field import P
from mpc_agg.core.sharing import full_share_index

pytestmark = pytest.mark.processes


def integer_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Integer-valued vectors: exactly representable, so rounding is exact and totals too."""
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or raw bytes) of one raw HTTP request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def accepted_counts(collector: Collector, round_id: str) -> list[int]:
    return [s["accepted"] for s in collector.status(round_id)]


def test_twelve_clients_20000_dims_float_total(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 20_000)
    data = np.random.default_rng(1).uniform(-5, 5, size=(12, 20_000))
    for i, x in enumerate(data):
        Client(topo, f"c{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 12
    assert result.dropped_clients == 0
    assert result.total.shape == (20_000,)
    assert np.abs(result.total - data.sum(axis=0)).max() <= 1e-3
    assert result.epsilon is None and result.delta is None


def test_many_clients_exact_total(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 500)
    data = integer_vectors(40, 500, seed=2)

    async def submit_all() -> None:
        await asyncio.gather(
            *(Client(topo, f"k{i}").submit_async(round_id, x) for i, x in enumerate(data))
        )

    asyncio.run(submit_all())
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 40
    np.testing.assert_array_equal(result.total, data.sum(axis=0))


def test_two_party_topology(federation2, round_id):
    topo = federation2.topology
    collector = Collector(topo)
    collector.open_round(round_id, 300)
    data = integer_vectors(5, 300, seed=3)
    for i, x in enumerate(data):
        Client(topo, f"p{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 5
    np.testing.assert_array_equal(result.total, data.sum(axis=0))


def _client_with_full_share_at(m: int, index: int, prefix: str) -> str:
    return next(f"{prefix}{k}" for k in range(1000) if full_share_index(f"{prefix}{k}", m) == index)


def test_partial_uploads_are_excluded_everywhere(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 200)
    complete = integer_vectors(4, 200, seed=4)
    for i, x in enumerate(complete):
        Client(topo, f"whole{i}").submit(round_id, x)
    partial = integer_vectors(3, 200, seed=5)
    # Three partial clients: one misses the leader; one whose full share (journaled bytes)
    # reached two aggregators but not the third; one that reached a single aggregator.
    plans = [
        (_client_with_full_share_at(3, 1, "halfA"), [1, 2]),
        (_client_with_full_share_at(3, 0, "halfB"), [0, 1]),
        (_client_with_full_share_at(3, 2, "halfC"), [2]),
    ]
    for (cid, targets), x in zip(plans, partial, strict=True):
        client = Client(topo, cid)
        receipt = asyncio.run(
            client.upload(round_id, client.prepare(round_id, x), aggregators=targets)
        )
        assert receipt.upload_bytes > 0
    assert accepted_counts(collector, round_id) == [5, 6, 6]  # 4 whole + partials
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 4
    assert result.dropped_clients == 3
    np.testing.assert_array_equal(result.total, complete.sum(axis=0))


def test_duplicate_and_conflicting_uploads(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 100)
    x, y, other = integer_vectors(3, 100, seed=6)
    alice = Client(topo, "alice")
    bodies = alice.prepare(round_id, x)
    first = asyncio.run(alice.upload(round_id, bodies))
    assert first.retries == ()
    again = asyncio.run(alice.upload(round_id, bodies))  # an identical retry is a no-op
    assert again.retries == (0, 1, 2)
    with pytest.raises(UploadRefused) as refused:
        alice.submit(round_id, y)  # a different vector for the same (round, client)
    assert refused.value.status == 409
    assert refused.value.code == "conflicting_share"
    assert "first upload stands" in refused.value.detail
    bob = Client(topo, "bob")
    bob.submit(round_id, other)
    assert bob.submit(round_id, other).retries == (0, 1, 2)  # same vector: same bytes resent
    assert accepted_counts(collector, round_id) == [2, 2, 2]
    result = collector.aggregate(round_id, timeout=60)
    np.testing.assert_array_equal(result.total, x + other)
    # A retry that arrives after the round ended still learns its share was held.
    assert asyncio.run(alice.upload(round_id, bodies)).retries == (0, 1, 2)


def test_wrong_dimension_is_refused_and_nothing_is_accepted(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 64)
    with pytest.raises(UploadRefused) as refused:
        Client(topo, "shorty").submit(round_id, np.ones(63))
    assert refused.value.status == 400
    assert refused.value.code == "wrong_dimension"
    assert "63" in refused.value.detail and "64" in refused.value.detail
    assert refused.value.accepted == ()
    assert accepted_counts(collector, round_id) == [0, 0, 0]


def test_malformed_bodies_get_400_json_and_round_stays_correct(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    d = 50
    collector.open_round(round_id, d)
    good = integer_vectors(2, d, seed=7)
    Client(topo, "good0").submit(round_id, good[0])

    # A valid full share for aggregator 0, to mutate.
    cid = _client_with_full_share_at(3, 0, "evil")
    body = Client(topo, cid).prepare(round_id, good[1])[0]
    assert len(body) == SHARE_HEADER.size + 8 * d
    too_big = bytearray(body)
    too_big[SHARE_HEADER.size : SHARE_HEADER.size + 8] = struct.pack("<Q", P)
    cases = {
        "wrong length": (body[:-8], "malformed", "bytes"),
        "value >= p": (bytes(too_big), "malformed", "index 0"),
        "bad magic": (b"XXXX" + body[4:], "malformed", "magic"),
        "bad version": (body[:4] + b"\x09" + body[5:], "malformed", "version"),
        "bad kind": (body[:5] + b"\x07" + body[6:], "malformed", "kind"),
        "other aggregator": (body[:6] + b"\x02" + body[7:], "malformed", "aggregator 2"),
        "header only": (body[:5], "malformed", "header"),
        "empty": (b"", "malformed", "header"),
        "wrong dim": (
            body[:8] + struct.pack("<I", d + 1) + body[12:],
            "wrong_dimension",
            "dimension",
        ),
    }
    url = f"{topo.aggregators[0].url}/v1/rounds/{round_id}/shares/{cid}"
    for name, (bad, code, words) in cases.items():
        status, answer = http("PUT", url, bad)
        assert status == 400, name
        assert answer["error"] == code, name
        assert words in answer["detail"], (name, answer)

    # A seed share with a trailing byte; a full share with one (over the round's size limit).
    seed_body = Client(topo, cid).prepare(round_id, good[1])[1]
    base = topo.aggregators[1].url
    status, answer = http("PUT", f"{base}/v1/rounds/{round_id}/shares/{cid}", seed_body + b"\0")
    assert (status, answer["error"]) == (400, "malformed")
    assert "29" in answer["detail"], answer
    status, answer = http("PUT", url, body + b"\0")
    assert (status, answer["error"]) == (413, "too_large")

    # Ids, unknown rounds and oversized bodies.
    status, answer = http("PUT", f"{base}/v1/rounds/{round_id}/shares/bad%20id", body)
    assert (status, answer["error"]) == (400, "invalid_request")
    status, answer = http("PUT", f"{base}/v1/rounds/no-such-round/shares/x", body)
    assert (status, answer["error"]) == (404, "unknown_round")
    status, answer = http("PUT", f"{base}/v1/rounds/{round_id}/shares/big", bytes(len(body) + 1))
    assert (status, answer["error"]) == (413, "too_large")
    status, answer = http("GET", f"{base}/v1/nothing-here")
    assert (status, answer["error"]) == (404, "not_found")

    # A chunked upload announces no length: its memory cannot be reserved before reading.
    a0 = topo.aggregators[0]
    with socket.create_connection((a0.host, a0.http_port), timeout=10) as conn:
        conn.sendall(
            f"PUT /v1/rounds/{round_id}/shares/{cid} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
            + b"%x\r\n" % len(body)
            + bytes(body)
            + b"\r\n0\r\n\r\n"
        )
        answer_raw = b""
        while chunk := conn.recv(65536):
            answer_raw += chunk
    head, _, payload = answer_raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411"), head
    assert json.loads(payload)["error"] == "length_required"

    # Nothing of the above was accepted; the round still aggregates exactly.
    Client(topo, "good1").submit(round_id, good[1])
    assert accepted_counts(collector, round_id) == [2, 2, 2]
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 2
    np.testing.assert_array_equal(result.total, good.sum(axis=0))


def test_too_few_clients_fails_and_reveals_nothing(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    collector.open_round(round_id, 10, min_clients=3)
    data = integer_vectors(3, 10, seed=8)
    Client(topo, "only0").submit(round_id, data[0])
    Client(topo, "only1").submit(round_id, data[1])
    # A third client reaches only aggregator 2: it is dropped, leaving 2 < 3.
    third = Client(topo, "only2")
    asyncio.run(third.upload(round_id, third.prepare(round_id, data[2]), aggregators=[2]))
    with pytest.raises(RoundFailed) as failed:
        collector.aggregate(round_id, timeout=60)
    assert "min_clients is 3" in failed.value.reason
    assert "nothing is revealed" in failed.value.reason
    for a in topo.aggregators:
        status, answer = http("GET", f"{a.url}/v1/rounds/{round_id}/result")
        assert (status, answer["error"]) == (410, "round_failed")
    assert {s["state"] for s in collector.status(round_id)} == {"failed"}
    # Uploads to the failed round are refused as ended.
    with pytest.raises(UploadRefused) as late:
        Client(topo, "late").submit(round_id, data[0])
    assert (late.value.status, late.value.code) == (410, "round_ended")


def test_round_lifecycle_errors(federation3, round_id):
    topo = federation3.topology
    collector = Collector(topo)
    leader, follower = topo.aggregators[0].url, topo.aggregators[1].url
    status, answer = http("POST", f"{leader}/v1/rounds/{round_id}/close")
    assert (status, answer["error"]) == (404, "unknown_round")
    status, answer = http("GET", f"{leader}/v1/rounds/{round_id}/result")
    assert (status, answer["error"]) == (404, "unknown_round")
    collector.open_round(round_id, 8)
    collector.open_round(round_id, 8)  # idempotent
    status, answer = http(
        "PUT",
        f"{leader}/v1/rounds/{round_id}",
        json.dumps({"dim": 9}).encode(),
        {"Content-Type": "application/json"},
    )
    assert (status, answer["error"]) == (409, "round_conflict")
    deep = b"[" * 2000 + b"]" * 2000
    for bad in (b"not json", b'{"dim": 0}', b'{"dim": "8"}', b'{"dim": 8, "x": 1}', b"{}", deep):
        status, answer = http("PUT", f"{leader}/v1/rounds/other-{round_id}", bad)
        assert (status, answer["error"]) == (400, "invalid_request"), bad
    status, answer = http("POST", f"{follower}/v1/rounds/{round_id}/close")
    assert (status, answer["error"]) == (409, "not_leader")
    status, answer = http("GET", f"{leader}/v1/rounds/{round_id}/result")
    assert (status, answer["error"]) == (409, "result_not_ready")
    data = integer_vectors(2, 8, seed=9)
    for i, x in enumerate(data):
        Client(topo, f"life{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    again = collector.aggregate(round_id, timeout=60)  # closing a DONE round is idempotent
    np.testing.assert_array_equal(result.total, again.total)
    with pytest.raises(UploadRefused) as late:
        Client(topo, "life-late").submit(round_id, data[0])
    assert (late.value.status, late.value.code) == (410, "round_ended")


def test_health_and_metrics(federation3):
    a = federation3.topology.aggregators[2]
    status, answer = http("GET", f"{a.url}/healthz")
    assert status == 200 and answer == {"status": "ok", "aggregator": 2, "mpc": "connected"}
    status, text = http("GET", f"{a.url}/metrics")
    assert status == 200
    assert b'mpc_agg_uploads_accepted_total{aggregator="2"}' in text


def test_aggregators_that_disagree_on_the_round_reveal_nothing(federation3, round_id):
    topo = federation3.topology
    a0, a1, a2 = (a.url for a in topo.aggregators)
    # Round A is open at aggregators 0 and 1 only; round B has another dimension at 2.
    for url in (a0, a1):
        assert http("PUT", f"{url}/v1/rounds/{round_id}-a", b'{"dim": 4}')[0] == 201
    for url, dim in ((a0, 4), (a1, 4), (a2, 5)):
        assert http("PUT", f"{url}/v1/rounds/{round_id}-b", f'{{"dim": {dim}}}'.encode())[0] == 201
    collector = Collector(topo)
    with pytest.raises(RoundFailed, match="unknown at aggregator 2"):
        collector.aggregate(f"{round_id}-a", timeout=60)
    with pytest.raises(RoundFailed, match="different dimensions"):
        collector.aggregate(f"{round_id}-b", timeout=60)
    # The party network is still in step: the next round works.
    collector.open_round(round_id, 4)
    data = integer_vectors(2, 4, seed=10)
    for i, x in enumerate(data):
        Client(topo, f"after{i}").submit(round_id, x)
    np.testing.assert_array_equal(collector.aggregate(round_id, timeout=60).total, data.sum(axis=0))
