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

from mpc_agg import Collector, RoundFailed, UploadRefused
from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.core.codec import SHARE_HEADER
from mpc_agg.core.field import P
from mpc_agg.core.sharing import full_share_index
from mpc_agg.transport.tls import https_client_context

pytestmark = pytest.mark.processes


def integer_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Integer-valued vectors: exactly representable, so rounding is exact and totals too."""
    return np.random.default_rng(seed).integers(-1000, 1001, size=(n, d)).astype(np.float64)


def http(
    method: str,
    address: AggregatorAddress,
    path: str,
    body: bytes | None = None,
    headers: dict | None = None,
    *,
    token: str | None = None,
):
    """(status, parsed JSON or raw bytes) of one raw HTTPS request to the aggregator at
    ``address`` (its pinned certificate), with ``token`` as the bearer token."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(address.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=https_client_context(address)) as resp:
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
    collector = federation3.collector()
    collector.open_round(round_id, 20_000)
    data = np.random.default_rng(1).uniform(-5, 5, size=(12, 20_000))
    for i, x in enumerate(data):
        federation3.client(f"c{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 12
    assert result.dropped_clients == 0
    assert result.total.shape == (20_000,)
    assert np.abs(result.total - data.sum(axis=0)).max() <= 1e-3
    assert result.epsilon is None and result.delta is None
    assert len(result.statements) == 3  # every aggregator vouched for the total


def test_many_clients_exact_total(federation3, round_id):
    collector = federation3.collector()
    collector.open_round(round_id, 500)
    data = integer_vectors(40, 500, seed=2)
    clients = [federation3.client(f"k{i}") for i in range(len(data))]

    async def submit_all() -> None:
        await asyncio.gather(
            *(c.submit_async(round_id, x) for c, x in zip(clients, data, strict=True))
        )

    asyncio.run(submit_all())
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 40
    np.testing.assert_array_equal(result.total, data.sum(axis=0))


def test_two_party_topology(federation2, round_id):
    collector = federation2.collector()
    collector.open_round(round_id, 300)
    data = integer_vectors(5, 300, seed=3)
    for i, x in enumerate(data):
        federation2.client(f"p{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 5
    np.testing.assert_array_equal(result.total, data.sum(axis=0))


def _client_with_full_share_at(m: int, index: int, prefix: str) -> str:
    return next(f"{prefix}{k}" for k in range(1000) if full_share_index(f"{prefix}{k}", m) == index)


def test_partial_uploads_are_excluded_everywhere(federation3, round_id):
    collector = federation3.collector()
    collector.open_round(round_id, 200)
    complete = integer_vectors(4, 200, seed=4)
    for i, x in enumerate(complete):
        federation3.client(f"whole{i}").submit(round_id, x)
    partial = integer_vectors(3, 200, seed=5)
    # Three partial clients: one misses the leader; one whose full share (journaled bytes)
    # reached two aggregators but not the third; one that reached a single aggregator.
    plans = [
        (_client_with_full_share_at(3, 1, "halfA"), [1, 2]),
        (_client_with_full_share_at(3, 0, "halfB"), [0, 1]),
        (_client_with_full_share_at(3, 2, "halfC"), [2]),
    ]
    for (cid, targets), x in zip(plans, partial, strict=True):
        client = federation3.client(cid)
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
    collector = federation3.collector()
    collector.open_round(round_id, 100)
    x, y, other = integer_vectors(3, 100, seed=6)
    alice = federation3.client("alice")
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
    bob = federation3.client("bob")
    bob.submit(round_id, other)
    assert bob.submit(round_id, other).retries == (0, 1, 2)  # same vector: same bytes resent
    assert accepted_counts(collector, round_id) == [2, 2, 2]
    result = collector.aggregate(round_id, timeout=60)
    np.testing.assert_array_equal(result.total, x + other)
    # A retry that arrives after the round ended still learns its share was held.
    assert asyncio.run(alice.upload(round_id, bodies)).retries == (0, 1, 2)


def test_wrong_dimension_is_refused_and_nothing_is_accepted(federation3, round_id):
    collector = federation3.collector()
    collector.open_round(round_id, 64)
    with pytest.raises(UploadRefused) as refused:
        federation3.client("shorty").submit(round_id, np.ones(63))
    assert refused.value.status == 400
    assert refused.value.code == "wrong_dimension"
    assert "63" in refused.value.detail and "64" in refused.value.detail
    assert refused.value.accepted == ()
    assert accepted_counts(collector, round_id) == [0, 0, 0]


def test_malformed_bodies_get_400_json_and_round_stays_correct(federation3, round_id):
    topo = federation3.topology
    tokens = federation3.deployment.client_tokens
    collector = federation3.collector()
    d = 50
    collector.open_round(round_id, d)
    good = integer_vectors(2, d, seed=7)
    federation3.client("good0").submit(round_id, good[0])

    # A valid full share for aggregator 0, to mutate.
    cid = _client_with_full_share_at(3, 0, "evil")
    evil = federation3.client(cid)
    body = evil.prepare(round_id, good[1])[0]
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
    a0, a1 = topo.aggregators[0], topo.aggregators[1]
    share_path = f"/v1/rounds/{round_id}/shares/{cid}"
    for name, (bad, code, words) in cases.items():
        status, answer = http("PUT", a0, share_path, bad, token=tokens(cid)[0])
        assert status == 400, name
        assert answer["error"] == code, name
        assert words in answer["detail"], (name, answer)

    # A seed share one byte short; a seed or full share with a trailing byte is over the
    # size limit of the share this aggregator expects from this client.
    seed_body = evil.prepare(round_id, good[1])[1]
    status, answer = http("PUT", a1, share_path, seed_body[:-1], token=tokens(cid)[1])
    assert (status, answer["error"]) == (400, "malformed")
    assert "is 28 bytes, got 27" in answer["detail"], answer
    status, answer = http("PUT", a1, share_path, seed_body + b"\0", token=tokens(cid)[1])
    assert (status, answer["error"]) == (413, "too_large")
    status, answer = http("PUT", a0, share_path, body + b"\0", token=tokens(cid)[0])
    assert (status, answer["error"]) == (413, "too_large")
    # A well-formed share of the wrong kind: the full share goes to the one aggregator
    # full_share_index names (here 0), seed shares everywhere else.
    seed_at_0 = seed_body[:6] + b"\x00" + seed_body[7:]
    status, answer = http("PUT", a0, share_path, seed_at_0, token=tokens(cid)[0])
    assert (status, answer["error"]) == (400, "malformed")
    assert "must send a full share" in answer["detail"], answer

    # Ids, unknown rounds and oversized bodies.
    status, answer = http("PUT", a1, f"/v1/rounds/{round_id}/shares/bad%20id", body)
    assert (status, answer["error"]) == (400, "invalid_request")
    status, answer = http(
        "PUT", a1, "/v1/rounds/no-such-round/shares/x", body, token=tokens("x")[1]
    )
    assert (status, answer["error"]) == (404, "unknown_round")
    status, answer = http(
        "PUT",
        a1,
        f"/v1/rounds/{round_id}/shares/big",
        bytes(len(body) + 1),
        token=tokens("big")[1],
    )
    assert (status, answer["error"]) == (413, "too_large")
    status, answer = http("GET", a1, "/v1/nothing-here")
    assert (status, answer["error"]) == (404, "not_found")

    # A chunked upload announces no length: its memory cannot be reserved before reading.
    context = https_client_context(a0)
    assert context is not None
    with (
        socket.create_connection((a0.host, a0.http_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=a0.host) as conn,
    ):
        conn.sendall(
            f"PUT {share_path} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {tokens(cid)[0]}\r\n"
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
    federation3.client("good1").submit(round_id, good[1])
    assert accepted_counts(collector, round_id) == [2, 2, 2]
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 2
    np.testing.assert_array_equal(result.total, good.sum(axis=0))


def test_too_few_clients_fails_and_reveals_nothing(federation3, round_id):
    topo = federation3.topology
    collector = federation3.collector()
    collector.open_round(round_id, 10, min_clients=3)
    data = integer_vectors(3, 10, seed=8)
    federation3.client("only0").submit(round_id, data[0])
    federation3.client("only1").submit(round_id, data[1])
    # A third client reaches only aggregator 2: it is dropped, leaving 2 < 3.
    third = federation3.client("only2")
    asyncio.run(third.upload(round_id, third.prepare(round_id, data[2]), aggregators=[2]))
    with pytest.raises(RoundFailed) as failed:
        collector.aggregate(round_id, timeout=60)
    assert "min_clients is 3" in failed.value.reason
    assert "nothing is revealed" in failed.value.reason
    tokens = federation3.deployment.collector_tokens()
    for a in topo.aggregators:
        for what in ("result", "statement"):
            path = f"/v1/rounds/{round_id}/{what}"
            status, answer = http("GET", a, path, token=tokens[a.index])
            assert (status, answer["error"]) == (410, "round_failed"), what
    assert {s["state"] for s in collector.status(round_id)} == {"failed"}
    # Uploads to the failed round are refused as ended.
    with pytest.raises(UploadRefused) as late:
        federation3.client("late").submit(round_id, data[0])
    assert (late.value.status, late.value.code) == (410, "round_ended")


def test_round_lifecycle_errors(federation3, round_id):
    topo = federation3.topology
    collector = federation3.collector()
    tokens = federation3.deployment.collector_tokens()
    leader, follower = topo.aggregators[0], topo.aggregators[1]
    lead, follow = tokens[0], tokens[1]
    status, answer = http("POST", leader, f"/v1/rounds/{round_id}/close", token=lead)
    assert (status, answer["error"]) == (404, "unknown_round")
    status, answer = http("GET", leader, f"/v1/rounds/{round_id}/result", token=lead)
    assert (status, answer["error"]) == (404, "unknown_round")
    collector.open_round(round_id, 8)
    collector.open_round(round_id, 8)  # idempotent
    status, answer = http(
        "PUT",
        leader,
        f"/v1/rounds/{round_id}",
        json.dumps({"dim": 9}).encode(),
        {"Content-Type": "application/json"},
        token=lead,
    )
    assert (status, answer["error"]) == (409, "round_conflict")
    deep = b"[" * 2000 + b"]" * 2000
    for bad in (b"not json", b'{"dim": 0}', b'{"dim": "8"}', b'{"dim": 8, "x": 1}', b"{}", deep):
        status, answer = http("PUT", leader, f"/v1/rounds/other-{round_id}", bad, token=lead)
        assert (status, answer["error"]) == (400, "invalid_request"), bad
    status, answer = http("POST", follower, f"/v1/rounds/{round_id}/close", token=follow)
    assert (status, answer["error"]) == (409, "not_leader")
    status, answer = http("GET", leader, f"/v1/rounds/{round_id}/result", token=lead)
    assert (status, answer["error"]) == (409, "result_not_ready")
    data = integer_vectors(2, 8, seed=9)
    for i, x in enumerate(data):
        federation3.client(f"life{i}").submit(round_id, x)
    result = collector.aggregate(round_id, timeout=60)
    again = collector.aggregate(round_id, timeout=60)  # closing a DONE round is idempotent
    np.testing.assert_array_equal(result.total, again.total)
    with pytest.raises(UploadRefused) as late:
        federation3.client("life-late").submit(round_id, data[0])
    assert (late.value.status, late.value.code) == (410, "round_ended")


def test_health_and_metrics(federation3):
    a = federation3.topology.aggregators[2]
    token = federation3.deployment.collector_tokens()[2]
    status, answer = http("GET", a, "/healthz", token=token)
    assert status == 200
    assert answer == {
        "status": "ok",
        "aggregator": 2,
        "mpc": "connected",
        "fingerprint": fingerprint(federation3.topology),
        "pid": federation3.party_pids[2],
    }
    status, text = http("GET", a, "/metrics", token=token)
    assert status == 200
    assert b'mpc_agg_uploads_accepted_total{aggregator="2"}' in text
    # Both need the collector's token; the topology is public.
    for path in ("/healthz", "/metrics"):
        assert http("GET", a, path)[0] == 401
        assert http("GET", a, path, token=federation3.deployment.client_tokens("c")[2])[0] == 403
    status, answer = http("GET", a, "/v1/topology")
    assert status == 200 and answer["fingerprint"] == fingerprint(federation3.topology)
    assert answer["aggregator"] == 2


def test_aggregators_that_disagree_on_the_round_reveal_nothing(federation3, round_id):
    topo = federation3.topology
    tokens = federation3.deployment.collector_tokens()
    a0, a1, a2 = topo.aggregators

    def open_at(a: AggregatorAddress, round_: str, dim: int) -> int:
        body = f'{{"dim": {dim}}}'.encode()
        return http("PUT", a, f"/v1/rounds/{round_}", body, token=tokens[a.index])[0]

    # Round A is open at aggregators 0 and 1 only; round B has another dimension at 2.
    for a in (a0, a1):
        assert open_at(a, f"{round_id}-a", 4) == 201
    for a, dim in ((a0, 4), (a1, 4), (a2, 5)):
        assert open_at(a, f"{round_id}-b", dim) == 201
    collector = federation3.collector()
    with pytest.raises(RoundFailed, match="unknown at aggregator 2"):
        collector.aggregate(f"{round_id}-a", timeout=60)
    with pytest.raises(RoundFailed, match="different dimensions"):
        collector.aggregate(f"{round_id}-b", timeout=60)
    # The party network is still in step: the next round works.
    collector.open_round(round_id, 4)
    data = integer_vectors(2, 4, seed=10)
    for i, x in enumerate(data):
        federation3.client(f"after{i}").submit(round_id, x)
    np.testing.assert_array_equal(collector.aggregate(round_id, timeout=60).total, data.sum(axis=0))
