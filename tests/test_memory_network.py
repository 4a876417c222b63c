"""The in-memory party network and the delaying wrapper (:mod:`mpc_agg.mpc.memory`): FIFO per
link, the PartyNetwork surface, and which exchanges the wrapper delays."""

from __future__ import annotations

import asyncio
import time

import pytest

from mpc_agg.mpc.memory import DelayingNetwork, InMemoryNetwork, memory_links, memory_networks


def test_exchange_and_broadcast_pair_calls_in_order() -> None:
    nets = memory_networks(3)

    async def party(net: InMemoryNetwork) -> tuple[list[object], list[object], object]:
        first = await net.exchange(("a", net.pid))
        second = await net.exchange(("b", net.pid))
        told = await net.broadcast("hello" if net.pid == 1 else None, sender=1)
        return first, second, told

    async def main() -> list[tuple[list[object], list[object], object]]:
        return await asyncio.gather(*(party(n) for n in nets))

    for first, second, told in asyncio.run(main()):
        assert first == [("a", 0), ("a", 1), ("a", 2)]
        assert second == [("b", 0), ("b", 1), ("b", 2)]
        assert told == "hello"
    assert nets[0].in_flight() == 0


def test_links_are_up_and_never_break() -> None:
    net = memory_networks(2)[1]
    assert (net.pid, net.m, net.connected, net.missing()) == (1, 2, True, [])
    assert not net.broken.is_set()
    with pytest.raises(NotImplementedError, match="MPyC"):
        asyncio.run(net.joint_binomial_sum(None, 10))


def test_bad_links_or_pid_are_refused() -> None:
    with pytest.raises(ValueError, match="m \\* m"):
        InMemoryNetwork(0, {(0, 0): asyncio.Queue(), (0, 1): asyncio.Queue()})
    with pytest.raises(ValueError, match="pid"):
        InMemoryNetwork(3, memory_links(3))
    with pytest.raises(ValueError):
        memory_networks(0)


def test_the_wrapper_delays_only_chosen_exchanges() -> None:
    nets = memory_networks(2)
    slow = DelayingNetwork(nets[0], 0.2, after=1, when=lambda obj: obj != "skip")
    assert (slow.pid, slow.m, slow.connected, slow.broken) == (0, 2, True, nets[0].broken)

    async def main() -> list[float]:
        starts = []
        for obj in ("first", "skip", "third"):
            t = time.monotonic()
            got = await asyncio.gather(slow.exchange(obj), nets[1].exchange(obj))
            assert got == [[obj, obj], [obj, obj]]
            starts.append(time.monotonic() - t)
        return starts

    took = asyncio.run(main())
    assert took[0] < 0.15 and took[1] < 0.15  # before `after`; refused by `when`
    assert took[2] >= 0.2
    assert (slow.exchanges, slow.delayed) == (3, 1)


def test_the_wrapper_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay_exchange_s"):
        DelayingNetwork(memory_networks(1)[0], -1.0)
