"""The privacy ledger: composition, refusal without mutation, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from mpc_agg.dp.accountant import PrivacyEvent, PrivacyLedger, cumulative_epsilon
from mpc_agg.dp.calibration import SKELLAM_ORDERS, calibrate_gaussian, epsilon, gaussian_rdp
from mpc_agg.errors import BudgetExceeded
from mpc_agg.storage.ledger import LedgerFile

ORD = tuple(float(o) for o in SKELLAM_ORDERS)


def gaussian_event(round_id: str, sigma: float) -> PrivacyEvent:
    rdp = gaussian_rdp(sigma, 1.0, SKELLAM_ORDERS)
    return PrivacyEvent(round_id, "test", 1.0, 1e-5, ORD, tuple(float(r) for r in rdp))


def test_composition_adds_rdp_curves():
    # k Gaussian rounds of noise sigma compose to one of noise sigma / sqrt(k) (exactly in RDP).
    sigma = 4.0
    events = [gaussian_event(f"r{i}", sigma) for i in range(4)]
    single = epsilon(SKELLAM_ORDERS, gaussian_rdp(sigma / 2, 1.0, SKELLAM_ORDERS), 1e-5)
    assert cumulative_epsilon(events, 1e-5) == pytest.approx(single, rel=1e-9)
    assert cumulative_epsilon([], 1e-5) == 0.0


def test_check_refuses_without_changing_anything():
    sigma = calibrate_gaussian(1.0, 1e-5, 1.0)
    ledger = PrivacyLedger(1.3, 1e-5)
    first = ledger.commit(gaussian_event("r1", sigma))
    assert first <= 1.0 + 1e-9
    with pytest.raises(BudgetExceeded) as err:
        ledger.commit(gaussian_event("r2", sigma))
    assert "'r2'" in str(err.value) and "budget of 1.3" in str(err.value)
    assert [e.round_id for e in ledger.events] == ["r1"]
    assert ledger.spent() == pytest.approx(first)


def test_a_second_release_under_the_same_round_id_is_charged_again():
    # The round-id reuse bypass: a held round id used to cost nothing the second time.
    sigma = calibrate_gaussian(1.0, 1e-5, 1.0)
    ledger = PrivacyLedger(8.0, 1e-5)
    first = ledger.commit(gaussian_event("r1", sigma))
    second = ledger.commit(gaussian_event("r1", sigma))
    assert second > first * 1.2  # two Gaussian releases compose to more than one
    assert len(ledger.events) == 2
    tight = PrivacyLedger(1.3, 1e-5, [gaussian_event("r1", sigma)])
    with pytest.raises(BudgetExceeded, match="'r1'"):
        tight.check(gaussian_event("r1", sigma))


def test_mixed_orders_cannot_compose():
    a = gaussian_event("a", 3.0)
    b = PrivacyEvent("b", "test", 1.0, 1e-5, (2.0, 3.0), (0.1, 0.2))
    with pytest.raises(ValueError, match="other RDP orders"):
        cumulative_epsilon([a, b], 1e-5)


def test_ledger_file_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    store = LedgerFile(path, fsync=False)
    events = [gaussian_event("r1", 5.0), gaussian_event("r2", 6.0)]
    for e in events:
        store.append(e)
    loaded = store.load(8.0, 1e-4)
    assert loaded.events == events
    with open(path, "ab") as f:
        f.write(b'{"round": "r3", "mech')  # a crash mid-append
    again = store.load(8.0, 1e-4)
    assert again.events == events
    assert path.read_text().count("\n") == 2  # the torn line is gone
    np.testing.assert_allclose(again.spent(), loaded.spent())


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text("not json\n" + gaussian_event("r1", 5.0).to_json() + "\n")
    with pytest.raises(ValueError, match="line 1"):
        LedgerFile(path).load(8.0, 1e-4)


def test_commit_persists_before_recording_and_not_when_refused():
    sigma = calibrate_gaussian(1.0, 1e-5, 1.0)
    ledger = PrivacyLedger(1.3, 1e-5)
    written: list[str] = []
    ledger.commit(gaussian_event("r1", sigma), persist=lambda e: written.append(e.round_id))
    with pytest.raises(BudgetExceeded):
        ledger.commit(gaussian_event("r2", sigma), persist=lambda e: written.append(e.round_id))
    assert written == ["r1"]

    def failing(event: PrivacyEvent) -> None:
        raise OSError("disk full")

    fresh = PrivacyLedger(8.0, 1e-5)
    with pytest.raises(OSError):
        fresh.commit(gaussian_event("r1", sigma), persist=failing)
    assert fresh.events == []


def test_a_failed_append_leaves_no_partial_line_to_swallow_the_next(tmp_path, monkeypatch):
    # A short write (disk full) used to leave a fragment; the next, real charge was glued to
    # it and dropped on load as "a torn last line".
    import os

    original_write = os.write

    path = tmp_path / "ledger.jsonl"
    store = LedgerFile(path, fsync=False)
    store.append(gaussian_event("r0", 5.0))
    calls = {"n": 0}

    def short_write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        return original_write(fd, data[:10])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError, match="short write"):
        store.append(gaussian_event("r1", 5.0))
    monkeypatch.undo()
    assert calls["n"] == 1
    store.append(gaussian_event("r2", 5.0))
    assert [e.round_id for e in store.load(8.0, 1e-4).events] == ["r0", "r2"]


def test_append_refuses_a_file_without_a_final_newline(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(gaussian_event("r0", 5.0).to_json())  # no newline: torn
    with pytest.raises(OSError, match="complete line"):
        LedgerFile(path, fsync=False).append(gaussian_event("r1", 5.0))
    assert LedgerFile(path, fsync=False).load(8.0, 1e-4).events == []  # dropped as torn
