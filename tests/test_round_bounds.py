"""Rounds with bounds (issue 13): ``rounds.max_open``, deadlines (``rounds.max_open_s``),
aborts (``DELETE /v1/rounds/{round}``), the list of rounds, and recovery that honours both.

Three Aggregator objects over the in-memory party network, driven by an injected clock (no
sleeps); the HTTP routes on aiohttp's test server; the collector over pinned HTTPS in this
process. Every round that fails here must fail at every party that holds it, with nothing
revealed (no share of a total sent), its journal gone and its id used for good.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.core.protocol import ABORT_CODES, AbortCommand, CloseCommand, decode, encode
from mpc_agg.core.rounds import Round, RoundState
from mpc_agg.errors import (
    FAILURE_CODES,
    ConfigError,
    NotLeader,
    ProtocolViolation,
    RoundAborted,
    RoundIdUsed,
    TooManyRounds,
    UnknownRound,
)
from mpc_agg.mpc.memory import memory_links
from mpc_agg.provision import provision_local
from mpc_agg.transport.http_server import status_for

from .conftest import topology_doc, write_topology
from .test_fail_closed import RecordingNetwork, sum_shares_sent
from .test_http_server import call, ended, https_federation, serving
from .test_http_server import run as run_bounded

D = 8
MAX_OPEN_S = 600.0


class FakeClock:
    """A monotonic clock the test moves, and the wall clock that goes with it."""

    def __init__(self, start: float = 100.0, wall: float = 1_700_000_000.0) -> None:
        self.t = start
        self._offset = wall - start

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.t + self._offset

    def advance(self, seconds: float) -> None:
        self.t += seconds


class SwitchedNetwork(RecordingNetwork):
    """A recording in-memory network whose links a test can declare down (``up``)."""

    def __init__(self, pid: int, links: dict) -> None:
        super().__init__(pid, links)
        self.up = True

    @property
    def connected(self) -> bool:
        return self.up


def federation(
    tmp_path: Path, clock: FakeClock, *, max_open: int = 64, max_open_s: float = MAX_OPEN_S
) -> list[Aggregator]:
    doc = topology_doc(3, 1, name="bounds")
    doc["data_dir"] = str(tmp_path / "data")
    doc["rounds"] = {
        "min_clients": 2,
        "max_clients": 100,
        "max_dim": 1000,
        "max_open": max_open,
        "max_open_s": max_open_s,
    }
    topology = Topology.from_dict(doc)
    links = memory_links(3)
    return [
        Aggregator(topology, i, SwitchedNetwork(i, links), clock=clock, wall_clock=clock.wall)
        for i in range(3)
    ]


def fill(aggs: list[Aggregator], round_id: str, n: int = 3, at: tuple[int, ...] = (0, 1, 2)):
    for i in at:
        aggs[i].open_round(round_id, D)
    xs = np.arange(n * D, dtype=np.float64).reshape(n, D)
    for k, x in enumerate(xs):
        bodies = Client(aggs[0].topology, f"{round_id}-c{k}").prepare(round_id, x)
        for i in at:
            assert aggs[i].receive_share(round_id, f"{round_id}-c{k}", bodies[i]) is True
    return xs


async def run_until(aggs: list[Aggregator], done: Callable[[], bool], limit_s: float = 5.0) -> None:
    """Run every party's command loop until ``done()`` holds (bounded in time)."""
    tasks = [asyncio.ensure_future(a.serve_commands()) for a in aggs]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while not done():
            if loop.time() > deadline:
                raise AssertionError("condition not reached")
            await asyncio.sleep(0.002)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def state_of(agg: Aggregator, round_id: str) -> RoundState | None:
    rnd = agg.rounds.get(round_id)
    return None if rnd is None else rnd.state


def journal_exists(agg: Aggregator, round_id: str) -> bool:
    return agg.store.journal_path(round_id).exists()


def assert_failed_for_good(aggs: list[Aggregator], round_id: str, code: str) -> None:
    """Failed with ``code`` at every party holding the round, nothing revealed, journal
    gone, id used (also for a new open)."""
    holding = [a for a in aggs if round_id in a.rounds]
    assert holding
    for a in holding:
        rnd = a.rounds[round_id]
        assert (rnd.state, rnd.failure_code) == (RoundState.FAILED, code), a.index
        assert rnd.total is None
        with pytest.raises(RoundAborted) as err:
            a.result(round_id)
        assert err.value.failure == code
        assert sum_shares_sent(a) == [], f"aggregator {a.index} sent a share of a total"
        assert not journal_exists(a, round_id)
        assert a.round_index.state(round_id) == "failed"
        with pytest.raises(RoundIdUsed):
            a.open_round(round_id, D)


def journal_descriptors() -> int:
    """Descriptors this process holds on round journals (0 where /proc/self/fd is missing:
    the check is Linux-only)."""
    if not Path("/proc/self/fd").is_dir():
        return 0
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.endswith(".journal")
    return count


# --------------------------------------------------------------------------- max_open


def test_opening_beyond_max_open_is_refused_with_its_own_code(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock, max_open=2)
    leader = aggs[0]
    for a in aggs:
        a.open_round("a", D)
        a.open_round("b", D)
    with pytest.raises(TooManyRounds, match="rounds.max_open = 2") as err:
        leader.open_round("c", D)
    assert err.value.code == "too_many_rounds" and status_for(err.value) == 429
    assert "c" not in leader.round_index and not journal_exists(leader, "c")
    assert leader.open_round("a", D) is False  # an idempotent re-open is not a new round

    async def abort_a() -> None:
        assert leader.abort_round("a")[0] is True
        await run_until(aggs, lambda: all(state_of(x, "a") is RoundState.FAILED for x in aggs))

    asyncio.run(abort_a())
    assert leader.open_round("c", D) is True  # the ended round freed its place
    with pytest.raises(TooManyRounds):
        leader.open_round("d", D)


# --------------------------------------------------------------------------- deadlines


def test_a_round_past_its_deadline_fails_everywhere_with_nothing_revealed(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    fill(aggs, "r")
    assert all(a.rounds["r"].deadline_unix == a.rounds["r"].opened_unix + MAX_OPEN_S for a in aggs)

    clock.advance(MAX_OPEN_S - 1)
    assert [a.check_deadlines() for a in aggs] == [0, 0, 0]
    clock.advance(1)
    assert [a.check_deadlines() for a in aggs] == [1, 0, 0]  # the leader decides
    assert aggs[0].check_deadlines() == 0  # queued once

    async def go() -> None:  # one event loop: the in-memory links belong to it
        await run_until(aggs, lambda: all(state_of(a, "r") is RoundState.FAILED for a in aggs))
        assert_failed_for_good(aggs, "r", "expired")
        assert "rounds.max_open_s = 600" in aggs[2].rounds["r"].failure
        # A close that comes too late is an abort too.
        fill(aggs, "late")
        clock.advance(MAX_OPEN_S)
        aggs[0].request_close("late")
        await run_until(aggs, lambda: all(state_of(a, "late") is RoundState.FAILED for a in aggs))
        assert_failed_for_good(aggs, "late", "expired")

    asyncio.run(go())


def test_a_round_opened_at_one_party_only_does_not_stay_open(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    fill(aggs, "at-follower", at=(2,))
    fill(aggs, "at-leader", at=(0,))
    clock.advance(MAX_OPEN_S)
    assert [a.check_deadlines() for a in aggs] == [1, 0, 0]
    assert state_of(aggs[2], "at-follower") is RoundState.OPEN  # the leader may still act

    async def go() -> None:
        await run_until(aggs, lambda: state_of(aggs[0], "at-leader") is RoundState.FAILED)

    asyncio.run(go())
    assert_failed_for_good(aggs, "at-leader", "expired")
    assert state_of(aggs[2], "at-follower") is RoundState.OPEN
    clock.advance(aggs[2].driver.grace_s - 1)
    assert aggs[2].check_deadlines() == 0
    clock.advance(1)
    assert aggs[2].check_deadlines() == 1  # nobody else knows it: it fails on its own
    assert_failed_for_good(aggs, "at-follower", "expired")


def test_a_leader_whose_links_are_down_fails_overdue_rounds_and_reconcile_tells_the_others(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    fill(aggs, "r")
    aggs[0].network.up = False
    clock.advance(MAX_OPEN_S)
    assert [a.check_deadlines() for a in aggs] == [1, 0, 0]
    assert state_of(aggs[0], "r") is RoundState.FAILED
    assert not journal_exists(aggs[0], "r")
    assert [state_of(a, "r") for a in aggs[1:]] == [RoundState.OPEN, RoundState.OPEN]
    aggs[0].network.up = True

    async def go() -> None:  # the links come up: reconcile first
        await run_until(aggs, lambda: all(state_of(a, "r") is RoundState.FAILED for a in aggs))

    asyncio.run(go())
    codes = [a.rounds["r"].failure_code for a in aggs]
    assert codes == ["expired", "ended_elsewhere", "ended_elsewhere"]
    assert all(not journal_exists(a, "r") and sum_shares_sent(a) == [] for a in aggs)


# --------------------------------------------------------------------------- abort


def test_abort_fails_the_round_everywhere_and_its_id_stays_used(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    leader = aggs[0]
    fill(aggs, "r")
    fill(aggs, "closing-too")
    with pytest.raises(NotLeader, match="aggregator 0"):
        aggs[1].abort_round("r")
    with pytest.raises(UnknownRound):
        leader.abort_round("never")
    under_way, status = leader.abort_round("r")
    assert (under_way, status["state"]) == (True, "open")
    assert leader.abort_round("r")[0] is True  # idempotent while queued
    leader.request_close("r")  # ignored: the abort is on its way
    # A close queued before the abort is overtaken by it.
    leader.request_close("closing-too")
    assert leader.abort_round("closing-too")[0] is True

    async def go() -> None:
        await run_until(
            aggs,
            lambda: all(
                state_of(a, r) is RoundState.FAILED for a in aggs for r in ("r", "closing-too")
            ),
        )

    asyncio.run(go())
    assert_failed_for_good(aggs, "r", "cancelled")
    assert_failed_for_good(aggs, "closing-too", "cancelled")
    under_way, status = leader.abort_round("r")  # an ended round: its state, idempotent
    assert (under_way, status["state"], status["failure_code"]) == (False, "failed", "cancelled")


def test_abort_while_the_links_are_down_ends_the_round_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    fill(aggs, "r")
    aggs[0].network.up = False
    under_way, status = aggs[0].abort_round("r")
    assert (under_way, status["state"], status["failure_code"]) == (False, "failed", "cancelled")
    assert not journal_exists(aggs[0], "r")
    aggs[0].network.up = True

    async def go() -> None:
        await run_until(aggs, lambda: all(state_of(a, "r") is RoundState.FAILED for a in aggs))

    asyncio.run(go())
    assert all(not journal_exists(a, "r") and sum_shares_sent(a) == [] for a in aggs)


# --------------------------------------------------------------------------- recovery


def restart(aggs: list[Aggregator], clock: FakeClock, **kwargs: Any) -> list[Aggregator]:
    """Stop the parties and start new ones on the same data directories."""
    for a in aggs:
        a.close_journals()
    topology = aggs[0].topology
    rounds = dataclasses.replace(topology.rounds, **kwargs)
    topology = dataclasses.replace(topology, rounds=rounds)
    links = memory_links(3)
    again = [
        Aggregator(topology, i, SwitchedNetwork(i, links), clock=clock, wall_clock=clock.wall)
        for i in range(3)
    ]
    for a in again:
        a.recover()
    return again


def test_recovery_keeps_at_most_max_open_rounds_those_opened_first(tmp_path: Path) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock, max_open=20)
    names = [f"j{k:02d}" for k in range(12)]
    for name in reversed(names):  # opened last-to-first: the id order is not the open order
        fill(aggs, name, n=2)
        clock.advance(1.0)
    later = FakeClock(start=5.0, wall=clock.wall() + 10)  # a new process: another clock
    again = restart(aggs, later, max_open=5)
    kept = sorted(names)[-5:]  # opened first
    for a in again:
        assert sorted(a.rounds) == kept
        assert [r.round_id for r in a.store.live_rounds()] == sorted(kept, reverse=True)
        assert all(len(a.rounds[r].accepted) == 2 for r in kept)
        for r in set(names) - set(kept):
            assert not journal_exists(a, r) and a.round_index.state(r) == "failed"
            with pytest.raises(RoundIdUsed):
                a.open_round(r, D)
    with pytest.raises(TooManyRounds):
        again[0].open_round("one-more", D)
    assert journal_descriptors() == 0
    # What came back works: a recovered round is revealed.

    async def close() -> None:
        again[0].request_close(kept[0])
        await run_until(again, lambda: all(state_of(a, kept[0]) is RoundState.DONE for a in again))

    asyncio.run(close())
    assert again[0].rounds[kept[0]].num_clients == 2


def test_recovery_fails_rounds_past_their_deadline_and_keeps_the_others_deadlines(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    fill(aggs, "old")
    clock.advance(400)
    fill(aggs, "new")
    # Down for 250 s: "old" (opened 650 s ago) is past its 600 s, "new" has 350 s left.
    later = FakeClock(start=7.0, wall=clock.wall() + 250)
    again = restart(aggs, later)
    for a in again:
        assert sorted(a.rounds) == ["new"]
        assert not journal_exists(a, "old") and a.round_index.state("old") == "failed"
        assert a.rounds["new"].deadline_at == pytest.approx(later() + 350)
        assert a.rounds["new"].opened_unix == aggs[a.index].rounds["new"].opened_unix
    later.advance(349)
    assert again[0].check_deadlines() == 0
    later.advance(1)
    assert again[0].check_deadlines() == 1

    async def go() -> None:
        await run_until(again, lambda: all(state_of(a, "new") is RoundState.FAILED for a in again))

    asyncio.run(go())
    assert_failed_for_good(again, "new", "expired")


def test_a_restart_after_many_junk_rounds_ends_them_in_one_index_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpc_agg.storage import round_index

    clock = FakeClock()
    aggs = federation(tmp_path, clock, max_open=300)
    leader = aggs[0]
    for k in range(300):
        leader.open_round(f"junk-{k:03d}", D)
        clock.advance(0.001)
    assert journal_descriptors() == 0  # open rounds hold no descriptor
    index = leader.round_index.path
    lines_before = index.read_text().count("\n")
    writes: list[int] = []
    real = round_index.append_line

    def counted(path: Path, line: bytes, **kwargs: Any) -> None:
        writes.append(line.count(b"\n"))
        real(path, line, **kwargs)

    monkeypatch.setattr(round_index, "append_line", counted)
    again = restart(aggs, clock, max_open=64)
    assert writes == [236]  # at the leader; the followers held no round
    assert len(again[0].rounds) == 64
    assert sorted(p.name for p in index.parent.glob("round-*.journal")) == [
        f"round-junk-{k:03d}.journal" for k in range(64)
    ]
    assert index.read_text().count("\n") == lines_before + 236
    assert journal_descriptors() == 0


def test_open_rounds_hold_no_file_descriptor_and_a_late_append_creates_nothing(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    aggs = federation(tmp_path, clock)
    for k in range(20):
        fill(aggs, f"r{k}", n=2)
    assert journal_descriptors() == 0
    journal = aggs[1].store.journals["r0"]
    assert journal.read(aggs[1].rounds["r0"].accepted["r0-c0"].ref)
    journal.discard()
    with pytest.raises(FileNotFoundError):
        journal.append_share("late", b"x")
    assert not journal.path.exists()


# --------------------------------------------------------------------------- messages, config


def test_the_abort_command_has_an_exact_codec() -> None:
    for code in ABORT_CODES:
        assert code in FAILURE_CODES
        message = AbortCommand("r-1", code)
        assert encode(message) == ("mpc_agg", 1, "abort", "r-1", code)
        assert decode(encode(message)) == message
    assert decode(encode(CloseCommand("r"))) == CloseCommand("r")
    for bad in (
        ("mpc_agg", 1, "abort", "r", "budget_exceeded"),
        ("mpc_agg", 1, "abort", "r"),
        ("mpc_agg", 1, "abort", "r", "expired", "extra"),
        ("mpc_agg", 1, "abort", 7, "expired"),
        ("mpc_agg", 2, "abort", "r", "expired"),
    ):
        with pytest.raises(ProtocolViolation):
            decode(bad)
    with pytest.raises(ValueError):
        AbortCommand("r", "whatever")


def test_round_bounds_in_the_topology() -> None:
    doc = topology_doc(3, 1, name="cfg")
    default = Topology.from_dict(doc)
    assert (default.rounds.max_open, default.rounds.max_open_s) == (64, 86400.0)
    doc["rounds"] = {**doc["rounds"], "max_open": 3, "max_open_s": 60}
    topology = Topology.from_dict(doc)
    assert (topology.rounds.max_open, topology.rounds.max_open_s) == (3, 60.0)
    assert fingerprint(topology) == fingerprint(default)  # local tuning, like deadlines
    for key, value in (
        ("max_open", 0),
        ("max_open", 2.5),
        ("max_open_s", 0),
        ("max_open_s", -5),
        ("max_open_s", True),
        ("max_open_s", "1h"),
        ("max_open_s", float("nan")),
        ("max_open_s", 31 * 86400),
    ):
        bad = {**doc, "rounds": {**doc["rounds"], key: value}}
        with pytest.raises(ConfigError, match=f"rounds.{key}"):
            Topology.from_dict(bad)
    r = Round("x", 4, 2, opened_at=0.0, deadline_at=10.0)
    assert not r.overdue(9.9) and r.overdue(10.0) and not r.overdue(10.0, grace=1.0)
    r.fail("gone", "cancelled")
    assert not r.overdue(1e9)


# --------------------------------------------------------------------------- HTTP, collector


def test_list_and_delete_rounds_over_http(tmp_path: Path) -> None:
    rounds = {"min_clients": 2, "max_clients": 100, "max_dim": 1000, "max_open": 2}
    token = {"Authorization": "Bearer " + "c0ffee" * 8}

    async def main() -> None:
        async with serving(tmp_path, auth_on=True, commands=True, rounds=rounds) as (
            aggs,
            clients,
        ):
            leader, follower = clients[0], clients[1]
            assert (await call(leader, "GET", "/v1/rounds"))[0] == 401
            assert (await call(leader, "DELETE", "/v1/rounds/r1"))[0] == 401
            for r in ("r1", "r2"):
                for c in clients:
                    assert (await call(c, "PUT", f"/v1/rounds/{r}", {"dim": 4}, headers=token))[
                        0
                    ] == 201
            status, answer = await call(leader, "PUT", "/v1/rounds/r3", {"dim": 4}, headers=token)
            assert (status, answer["error"]) == (429, "too_many_rounds")
            assert "rounds.max_open = 2" in answer["detail"]

            status, listing = await call(follower, "GET", "/v1/rounds", headers=token)
            assert status == 200
            assert (listing["aggregator"], listing["max_open"], listing["live"]) == (1, 2, 2)
            rows = [(x["round"], x["state"], x["dim"], x["accepted"]) for x in listing["rounds"]]
            assert rows == [("r1", "open", 4, 0), ("r2", "open", 4, 0)]
            first = listing["rounds"][0]
            assert first["deadline"] - first["opened"] == pytest.approx(86400.0)

            status, answer = await call(follower, "DELETE", "/v1/rounds/r1", headers=token)
            assert (status, answer["error"]) == (409, "not_leader")
            status, answer = await call(leader, "DELETE", "/v1/rounds/nope", headers=token)
            assert (status, answer["error"]) == (404, "unknown_round")
            status, answer = await call(leader, "DELETE", "/v1/rounds/r1", headers=token)
            assert (status, answer["round"]) == (202, "r1")
            await ended(clients, "r1", headers=token)
            status, answer = await call(leader, "DELETE", "/v1/rounds/r1", headers=token)
            assert (status, answer["state"], answer["failure_code"]) == (200, "failed", "cancelled")
            for c in clients:
                status, answer = await call(c, "GET", "/v1/rounds/r1/result", headers=token)
                assert (status, answer["error"], answer["failure"]) == (
                    410,
                    "round_failed",
                    "cancelled",
                )
                status, answer = await call(c, "PUT", "/v1/rounds/r1", {"dim": 4}, headers=token)
                assert (status, answer["error"]) == (409, "round_id_used")
            status, answer = await call(leader, "PUT", "/v1/rounds/r3", {"dim": 4}, headers=token)
            assert status == 201  # the aborted round freed its place
            status, listing = await call(leader, "GET", "/v1/rounds", headers=token)
            assert [(x["round"], x["state"], x["failure_code"]) for x in listing["rounds"]] == [
                ("r1", "failed", "cancelled"),
                ("r2", "open", None),
                ("r3", "open", None),
            ]
            assert all(not a.store.journal_path("r1").exists() for a in aggs)

    run_bounded(main())


def test_collector_lists_and_aborts_rounds_over_pinned_https(tmp_path: Path) -> None:
    template = write_topology(tmp_path, topology_doc(3, 1, name="abort-e2e"))
    deployment = provision_local(template, cwd=tmp_path)

    async def main() -> None:
        stack: list[Any] = []
        aggs: list[Aggregator] = []
        loops: list[asyncio.Task[None]] = []
        try:
            aggs, loops = await https_federation(deployment, stack)
            collector = deployment.collector(timeout_s=10.0)
            await collector.open_round_async("r", 4)
            await deployment.client("c0").submit_async("r", np.ones(4))
            listings = await collector.rounds_async()
            assert [x["aggregator"] for x in listings] == [0, 1, 2]
            assert all(
                [(r["round"], r["state"], r["accepted"]) for r in x["rounds"]] == [("r", "open", 1)]
                for x in listings
            )
            status = await collector.abort_async("r", timeout=10.0)
            assert (status["state"], status["failure_code"]) == ("failed", "cancelled")
            await asyncio.wait_for(
                _until(lambda: all(state_of(a, "r") is RoundState.FAILED for a in aggs)), 5
            )
            assert (await collector.abort_async("r"))["state"] == "failed"  # idempotent
            listings = await collector.rounds_async()
            assert all(x["rounds"][0]["failure_code"] == "cancelled" for x in listings)
            assert all(not a.store.journal_path("r").exists() for a in aggs)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            for runner in reversed(stack):
                await runner.cleanup()
            for a in aggs:
                a.close_journals()

    run_bounded(main(), timeout_s=30.0)


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.002)
