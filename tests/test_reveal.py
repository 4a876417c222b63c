"""The additive reveal over the in-memory party network (:mod:`mpc_agg.mpc.memory`): exact
totals for every length around the slice boundaries, and the same verdict at every party on
an abort."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from mpc_agg.core import field
from mpc_agg.core.sharing import unshard
from mpc_agg.errors import AgreementFailed
from mpc_agg.mpc import reveal
from mpc_agg.mpc.memory import memory_networks
from mpc_agg.mpc.reveal import reveal_slices, reveal_sum


def random_field(rng: np.random.Generator, d: int) -> np.ndarray:
    return rng.integers(0, field.P, size=d, dtype=np.uint64)


@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 17])
def test_every_party_gets_the_exact_total_across_slices(monkeypatch, d: int) -> None:
    monkeypatch.setattr(reveal, "REVEAL_SLICE", 4)  # several slices even for tiny vectors
    rng = np.random.default_rng(d)
    sums = [random_field(rng, d) for _ in range(3)]
    nets = memory_networks(3)
    expected = unshard(sums)  # before the reveal, which writes the total over each share

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(reveal_sum(n, s, d) for n, s in zip(nets, sums, strict=True)))

    totals = asyncio.run(main())
    for t, s in zip(totals, sums, strict=True):
        assert t is s  # in place: no second d-vector
    for t in totals:
        assert t.dtype == np.uint64 and np.array_equal(t, expected)
    assert len(reveal_slices(d)) == max(1, -(-d // 4))


def test_an_abort_fails_every_party_at_the_first_slice(monkeypatch) -> None:
    monkeypatch.setattr(reveal, "REVEAL_SLICE", 4)
    rng = np.random.default_rng(1)
    sums = [random_field(rng, 10), None, random_field(rng, 10)]
    nets = memory_networks(3)

    async def main() -> list[object]:
        return await asyncio.gather(
            *(reveal_sum(n, s, 10) for n, s in zip(nets, sums, strict=True)), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert all(isinstance(o, AgreementFailed) for o in outcomes)
    assert all("aggregator(s) [1] could not compute" in str(o) for o in outcomes)
    # Nothing is left in flight: every party stopped after the same (first) exchange.
    assert nets[0].in_flight() == 0


def test_reveal_slices_cover_the_vector_once() -> None:
    d = 3 * reveal.REVEAL_SLICE + 5
    slices = reveal_slices(d)
    assert slices[0][0] == 0 and slices[-1][1] == d
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
