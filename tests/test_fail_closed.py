"""Fail closed: a failure at any step between "the sums are fixed" and the reveal, at one
party, fails the round at every party with nothing revealed (docs/design.md, "Fail closed").

Three Aggregator objects over an in-memory party network that records what each party
sends. Each test injects one fault at aggregator 1 (plan lookup, budget check, the durable
close and reveal marks, the ledger append, noise sampling) and checks that every party
ends FAILED, that no party sent any share of the total, and what each ledger holds.
Faults are injected by replacing one method or file write (a full disk with real processes
is in tests/test_fail_closed_processes.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.core.rounds import RoundState
from mpc_agg.dp.accountant import PrivacyEvent
from mpc_agg.dp.discrete_gaussian import NoiseStream
from mpc_agg.errors import RoundAborted, RoundEnded, RoundIdUsed
from mpc_agg.mpc.memory import InMemoryNetwork
from mpc_agg.storage.journal import RoundJournal

from .conftest import dp_topology_doc, topology_doc
from .test_aggregator import run_round

FAULTY = 1
D = 64


class RecordingNetwork(InMemoryNetwork):
    """An in-memory party network that keeps every object this party sent in an exchange."""

    def __init__(self, pid: int, links: dict) -> None:
        super().__init__(pid, links)
        self.sent: list[Any] = []

    async def exchange(self, obj: Any) -> list[Any]:
        self.sent.append(obj)
        return await super().exchange(obj)


def federation(
    tmp_path: Path, *, dp: bool = True, budget: float = 8.0, **kwargs: Any
) -> list[Aggregator]:
    doc = dp_topology_doc("failclosed", budget) if dp else topology_doc(3, 1, name="fc")
    doc["data_dir"] = str(tmp_path / "data")
    topo = Topology.from_dict(doc)
    links = {(i, j): asyncio.Queue() for i in range(3) for j in range(3)}
    return [Aggregator(topo, i, RecordingNetwork(i, links), **kwargs) for i in range(3)]


def fill(aggs: list[Aggregator], round_id: str, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(5)
    data = rng.normal(size=(n, D)) * 0.05
    for a in aggs:
        a.open_round(round_id, D)
    for i, x in enumerate(data):
        bodies = Client(aggs[0].topology, f"c{i}").prepare(round_id, x)
        for a in aggs:
            assert a.receive_share(round_id, f"c{i}", bodies[a.index]) is True
    return data


def sum_shares_sent(agg: Aggregator) -> list[bytes]:
    """Every share of the total this party sent (reveal payloads are bytes)."""
    return [obj for obj in agg.network.sent if isinstance(obj, (bytes, bytearray))]


def assert_failed_everywhere_nothing_revealed(aggs: list[Aggregator], round_id: str) -> None:
    for a in aggs:
        rnd = a.rounds[round_id]
        assert rnd.state is RoundState.FAILED, (a.index, rnd.state)
        assert rnd.total is None
        with pytest.raises(RoundAborted):
            a.result(round_id)
        assert sum_shares_sent(a) == [], f"aggregator {a.index} sent a share of the total"


def ledger_rounds(agg: Aggregator) -> list[str]:
    """Round ids charged in the ledger, in memory and on disk (which must agree)."""
    assert agg.ledger is not None
    path = agg.topology.ledger_path(agg.index)
    on_disk = (
        [PrivacyEvent.from_json(x).round_id for x in path.read_text().splitlines()]
        if path.exists()
        else []
    )
    in_memory = [e.round_id for e in agg.ledger.events]
    assert on_disk == in_memory
    return in_memory


def test_baseline_the_same_round_without_a_fault_is_revealed(tmp_path) -> None:
    aggs = federation(tmp_path)
    data = fill(aggs, "r")
    asyncio.run(run_round(aggs, "r"))
    for a in aggs:
        assert a.rounds["r"].state is RoundState.DONE
        assert ledger_rounds(a) == ["r"]
        assert len(sum_shares_sent(a)) == 1
    assert aggs[0].rounds["r"].num_clients == len(data)


def test_missing_noise_plan_refuses_before_anything_is_sent(tmp_path) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "r")
    del aggs[FAULTY].privacy.mechanisms["r"]
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert "no noise plan" in aggs[0].rounds["r"].failure
    assert all(ledger_rounds(a) == [] for a in aggs)


def test_budget_refusal_at_one_party_fails_the_round_everywhere(tmp_path) -> None:
    aggs = federation(tmp_path, budget=1.2)

    async def two_rounds() -> None:
        fill(aggs, "r0")
        await run_round(aggs, "r0")
        # Only aggregator 1 has spent its budget (say, its ledger holds an earlier release).
        for a in aggs:
            a.network.sent.clear()
            if a.index != FAULTY:
                a.ledger.events.clear()
        fill(aggs, "r")
        await run_round(aggs, "r")

    asyncio.run(two_rounds())
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert "over the budget" in aggs[2].rounds["r"].failure
    assert [e.round_id for e in aggs[FAULTY].ledger.events] == ["r0"]
    assert [e.round_id for e in aggs[0].ledger.events] == []


@pytest.mark.parametrize("mark", ["closing", "revealing"])
def test_a_mark_that_cannot_be_made_durable_fails_the_round(tmp_path, monkeypatch, mark) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "r")
    journal = aggs[FAULTY].store.journals["r"]
    real = journal.append_mark

    def failing(state: str) -> None:
        if state == mark:
            raise OSError(28, "No space left on device")
        real(state)

    monkeypatch.setattr(journal, "append_mark", failing)
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert ledger_rounds(aggs[FAULTY]) == []
    # The others charged the attempt only if they had got as far as the noise.
    expected = ["r"] if mark == "revealing" else []
    assert ledger_rounds(aggs[0]) == expected and ledger_rounds(aggs[2]) == expected


def test_ledger_append_failure_reveals_nothing_and_records_nothing(tmp_path, monkeypatch) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "r")

    def disk_full(event: PrivacyEvent) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aggs[FAULTY].privacy.ledger_file, "append", disk_full)
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert ledger_rounds(aggs[FAULTY]) == []  # not charged in memory either
    assert ledger_rounds(aggs[0]) == ["r"] and ledger_rounds(aggs[2]) == ["r"]


def test_noise_sampling_failure_reveals_nothing_but_is_charged(tmp_path) -> None:
    class BrokenStream(NoiseStream):
        def words(self, n: int) -> np.ndarray:
            raise RuntimeError("keystream failure")

    aggs = federation(tmp_path)
    aggs[FAULTY].privacy.noise_stream = BrokenStream
    fill(aggs, "r")
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert all(ledger_rounds(a) == ["r"] for a in aggs)  # charged before the noise


def test_parties_that_disagree_on_the_noise_plan_refuse_before_anything_is_sent(
    tmp_path, monkeypatch
) -> None:
    # E.g. one party's topology file has another epsilon: it would add other noise than the
    # others' ledgers assume (and a plan the sampler cannot draw must never mean no noise).
    aggs = federation(tmp_path)
    fill(aggs, "r")
    plan = aggs[FAULTY].privacy.mechanisms["r"].plan
    changed = type(plan)(**{**plan.__dict__, "sigma2": 2**60})
    from mpc_agg.aggregator.privacy import DiscreteGaussianNoise

    monkeypatch.setitem(aggs[FAULTY].privacy.mechanisms, "r", DiscreteGaussianNoise(changed))
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert "disagree on the noise plan" in aggs[0].rounds["r"].failure
    assert all(ledger_rounds(a) == [] for a in aggs)


def test_a_ledger_that_cannot_check_refuses_in_step_with_the_others(tmp_path, monkeypatch) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "r")

    def broken(event: PrivacyEvent) -> float:
        raise ValueError("round 'old' was accounted on other RDP orders; cannot compose")

    monkeypatch.setattr(aggs[FAULTY].ledger, "check", broken)
    asyncio.run(run_round(aggs, "r"))
    assert_failed_everywhere_nothing_revealed(aggs, "r")
    assert "cannot check its privacy budget" in aggs[0].rounds["r"].failure
    assert len({len(a.network.sent) for a in aggs}) == 1  # every party made the same calls


async def _no_reconcile() -> int:
    return 0


def test_a_failed_close_broadcast_ends_the_round_for_good(tmp_path) -> None:
    from mpc_agg.errors import PartyLinkLost

    aggs = federation(tmp_path, dp=False)
    fill(aggs, "r")

    async def lost(obj: Any, sender: int) -> Any:
        raise PartyLinkLost("link to aggregator 2 lost")

    aggs[0].network.broadcast = lost
    aggs[0].driver.reconcile = _no_reconcile  # the others are not running here

    async def leader_only() -> None:
        task = asyncio.ensure_future(aggs[0].serve_commands())
        aggs[0].request_close("r")
        for _ in range(500):
            if aggs[0].rounds["r"].state is RoundState.FAILED:
                break
            await asyncio.sleep(0.002)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(leader_only())
    assert aggs[0].rounds["r"].state is RoundState.FAILED
    assert aggs[0].round_index.state("r") == "failed"
    assert not (aggs[0].topology.aggregator_dir(0) / "round-r.journal").exists()


def test_a_round_opened_under_other_dp_settings_is_not_recovered(tmp_path) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "r")
    for a in aggs:
        a.close_journals()
    again = federation(tmp_path, dp=False)  # the same data directory, DP switched off
    assert again[0].recover() == 0
    assert again[0].round_index.state("r") == "failed"
    with pytest.raises(RoundEnded):
        again[0].round_status("r")


def test_ids_spent_before_the_round_index_existed_stay_spent(tmp_path) -> None:
    aggs = federation(tmp_path)
    fill(aggs, "old")
    asyncio.run(run_round(aggs, "old"))
    for a in aggs:
        a.close_journals()
        a.round_index.path.unlink()  # as after an upgrade from a version without it
    again = federation(tmp_path)
    with pytest.raises(RoundIdUsed):
        again[1].open_round("old", D)


def test_a_ledger_that_forgot_a_revealed_round_stops_the_party(tmp_path) -> None:
    from mpc_agg.errors import StateError

    aggs = federation(tmp_path)
    fill(aggs, "r")
    asyncio.run(run_round(aggs, "r"))
    for a in aggs:
        a.close_journals()
    aggs[2].topology.ledger_path(2).unlink()  # lost, or started from another directory
    with pytest.raises(StateError, match="lacks 1 round"):
        federation(tmp_path)


def test_the_revealed_share_carries_noise(tmp_path) -> None:
    # With DP, what a party sends differs from its plain sum share by noise of the plan's size.
    aggs = federation(tmp_path)
    fill(aggs, "r")
    plain = aggs[FAULTY].rounds["r"].local_sum()
    asyncio.run(run_round(aggs, "r"))
    (sent,) = sum_shares_sent(aggs[FAULTY])
    from mpc_agg.core import field

    noise = field.to_signed(field.sub(np.frombuffer(sent, dtype="<u8").astype(np.uint64), plain))
    sigma = np.sqrt(aggs[FAULTY].privacy.mechanisms["r"].plan.sigma2)
    # (n - 1) s^2 / sigma^2 is chi-square(n - 1) for Gaussian noise: outside its 1e-9 and
    # 1 - 1e-9 quantiles with probability 2e-9 (a correct sampler fails this that rarely).
    from scipy import stats

    n = noise.size
    ratio = (n - 1) * float(np.var(noise.astype(np.float64), ddof=1)) / sigma**2
    assert stats.chi2.ppf(1e-9, n - 1) < ratio < stats.chi2.ppf(1 - 1e-9, n - 1)


# --------------------------------------------------------------------------- round ids


def test_round_ids_are_single_use_also_after_the_journal_is_gone(tmp_path) -> None:
    aggs = federation(tmp_path, dp=False)
    fill(aggs, "r1")
    asyncio.run(run_round(aggs, "r1"))
    assert not list(aggs[0].topology.aggregator_dir(0).glob("round-*.journal"))
    with pytest.raises(RoundIdUsed, match="single-use"):
        aggs[0].open_round("r1", D)
    # A restarted aggregator still knows the id.
    for a in aggs:
        a.close_journals()
    again = federation(tmp_path, dp=False)
    assert again[1].recover() == 0
    with pytest.raises(RoundIdUsed) as err:
        again[1].open_round("r1", D)
    assert err.value.code == "round_id_used"
    with pytest.raises(RoundEnded, match="before aggregator 1 last restarted"):
        again[1].round_status("r1")


@pytest.mark.parametrize("mark", ["closing", "revealing"])
def test_a_round_stopped_mid_aggregation_comes_back_failed(tmp_path, mark) -> None:
    aggs = federation(tmp_path, dp=False)
    fill(aggs, "r")
    aggs[FAULTY].store.journals["r"].append_mark(mark)  # the party stops here (crash)
    for a in aggs:
        a.close_journals()
    again = federation(tmp_path, dp=False)
    assert again[FAULTY].recover() == 0
    assert "r" not in again[FAULTY].rounds
    assert again[FAULTY].round_index.state("r") == "failed"
    with pytest.raises(RoundEnded):
        again[FAULTY].receive_share("r", "late", b"\x00" * 16)
    with pytest.raises(RoundIdUsed):
        again[FAULTY].open_round("r", D)
    # Its journal is gone; the other parties, which never marked it, still hold it open.
    assert not list(again[FAULTY].topology.aggregator_dir(FAULTY).glob("round-*.journal"))
    assert again[0].recover() == 1 and again[0].rounds["r"].state is RoundState.OPEN


def test_an_open_that_cannot_be_recorded_leaves_no_trace(tmp_path, monkeypatch) -> None:
    aggs = federation(tmp_path, dp=False)

    def disk_full(round_id: str, state: str, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aggs[0].round_index, "record", disk_full)
    from mpc_agg.errors import StorageFailure

    with pytest.raises(StorageFailure, match="nothing was created"):
        aggs[0].open_round("r", D)
    assert "r" not in aggs[0].rounds
    assert not list(aggs[0].topology.aggregator_dir(0).glob("round-*.journal"))
    monkeypatch.undo()
    assert aggs[0].open_round("r", D) is True  # the id is still usable


def test_a_journal_end_that_cannot_be_written_still_removes_the_journal(
    tmp_path, monkeypatch
) -> None:
    aggs = federation(tmp_path, dp=False)
    fill(aggs, "r")

    def disk_full(self: RoundJournal, state: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RoundJournal, "append_end", disk_full)
    asyncio.run(run_round(aggs, "r"))
    assert all(a.rounds["r"].state is RoundState.DONE for a in aggs)
    for a in aggs:
        assert not list(a.topology.aggregator_dir(a.index).glob("round-*.journal"))
        a.close_journals()
    monkeypatch.undo()
    again = federation(tmp_path, dp=False)
    assert again[0].recover() == 0  # it cannot come back open for a second reveal
    with pytest.raises(RoundIdUsed):
        again[0].open_round("r", D)


def test_reconcile_fails_a_round_that_ended_at_another_party(tmp_path) -> None:
    # Aggregator 1 crashed after the leader's close but before its closing mark: it got the
    # round back open, while the others had failed it when its link was lost.
    aggs = federation(tmp_path, dp=False)
    fill(aggs, "r")
    fill(aggs, "still-open")
    for a in (aggs[0], aggs[2]):
        a.driver.fail(a.rounds["r"], "the party network was lost", "party_lost")
        a.driver.wind_up(a.rounds["r"])

    async def reconcile_all() -> list[int]:
        return list(await asyncio.gather(*(a.reconcile() for a in aggs)))

    assert asyncio.run(reconcile_all()) == [0, 1, 0]
    assert aggs[FAULTY].rounds["r"].state is RoundState.FAILED
    assert "had ended at aggregator 0" in aggs[FAULTY].rounds["r"].failure
    assert aggs[FAULTY].round_index.state("r") == "failed"
    assert not (aggs[FAULTY].topology.aggregator_dir(FAULTY) / "round-r.journal").exists()
    assert all(a.rounds["still-open"].state is RoundState.OPEN for a in aggs)


def test_noise_the_sampler_cannot_draw_is_refused_at_open_naming_the_values(
    tmp_path, monkeypatch
) -> None:
    from mpc_agg.dp import planning
    from mpc_agg.errors import InvalidRequest

    aggs = federation(tmp_path)
    small = aggs[0].privacy.plan("probe-small", 1).sigma2
    big = aggs[0].privacy.plan("probe-big", 10_000).sigma2
    assert small < big
    monkeypatch.setattr(planning, "MAX_SIGMA2", small)  # as if the sampler stopped in between
    assert aggs[0].open_round("ok", 1) is True
    with pytest.raises(InvalidRequest) as err:
        aggs[0].open_round("too-big", 10_000)
    for part in ("d = 10000", "l2_clip = 1", "frac_bits = 16", "epsilon = 1", "lower"):
        assert part in err.value.detail
    assert "too-big" not in aggs[0].rounds and "too-big" not in aggs[0].round_index


def test_a_topology_whose_noise_cannot_be_drawn_is_refused_at_load() -> None:
    from mpc_agg.errors import ConfigError

    doc = dp_topology_doc("tooprecise", 8.0)
    doc["encoding"] = {"frac_bits": 32, "coord_clip": None}  # the auditor's setting
    with pytest.raises(ConfigError) as err:
        Topology.from_dict(doc)
    assert err.value.path == "dp"
    assert "frac_bits = 32" in err.value.detail and "exact" in err.value.detail
    assert "lower encoding.frac_bits by at least" in err.value.detail


def test_an_unreadable_journal_uses_up_its_round_id(tmp_path) -> None:
    aggs = federation(tmp_path, dp=False)
    directory = aggs[0].topology.aggregator_dir(0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "round-x.journal").write_bytes(b"not a journal")
    assert aggs[0].recover() == 0
    assert (directory / "round-x.unreadable").exists()
    with pytest.raises(RoundIdUsed):
        aggs[0].open_round("x", D)
