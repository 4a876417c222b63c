"""The aggregator's admission limits: uploads in flight (``rounds.max_concurrent_uploads``,
and a fair share per client id), and the upload buffer (``rounds.upload_buffer_mb``) whose
bytes a body takes as they arrive, with the oldest upload waiting for room and younger ones
refused (wait-die)."""

from __future__ import annotations

import asyncio

import pytest

from mpc_agg.errors import Busy, PayloadTooLarge
from mpc_agg.transport.upload_limits import ServerLimits, UploadBuffer, UploadLimits

from .conftest import topology_doc


async def settle() -> None:
    """Let every task that can run do so until it waits (a few loop iterations)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_bytes_are_taken_as_they_arrive_and_given_back_at_close() -> None:
    async def main() -> None:
        buf = UploadBuffer(100)
        first, second = buf.open(), buf.open()
        assert buf.used == 0  # announced lengths hold nothing
        assert await first.need(30, wait_s=5) == 0.0
        assert await first.need(20, wait_s=5) == 0.0  # already held
        assert await second.need(50, wait_s=5) == 0.0
        assert (buf.used, first.held, second.held) == (80, 30, 50)
        buf.close(first)
        buf.close(first)  # idempotent
        assert (buf.used, first.held) == (50, 0)
        buf.close(second)
        assert buf.used == 0

    asyncio.run(main())


def test_the_oldest_upload_waits_for_room_and_a_younger_one_is_refused() -> None:
    async def main() -> list[str]:
        buf = UploadBuffer(100, retry_after_s=3)
        oldest, middle, youngest = buf.open(), buf.open(), buf.open()
        await middle.need(70, wait_s=5)
        order: list[str] = []

        async def grow_oldest() -> None:
            await oldest.need(50, wait_s=5)  # 70 + 50 > 100: the oldest waits
            order.append("oldest has room")

        task = asyncio.ensure_future(grow_oldest())
        await settle()
        assert not task.done() and buf.used == 70
        with pytest.raises(Busy, match="an older upload is waiting for room") as refused:
            await youngest.need(40, wait_s=5)  # younger: refused at once, holds nothing new
        assert refused.value.retry_after_s == 3 and youngest.held == 0
        order.append("middle closed")
        buf.close(middle)
        await asyncio.wait_for(task, 5)
        assert buf.used == 50 and oldest.held == 50
        return order

    assert asyncio.run(main()) == ["middle closed", "oldest has room"]


def test_a_younger_upload_waits_until_the_oldest_has_to_wait() -> None:
    async def main() -> None:
        buf = UploadBuffer(100)
        oldest, younger = buf.open(), buf.open()
        await oldest.need(60, wait_s=5)

        async def grow(ticket: object, nbytes: int) -> None:
            await ticket.need(nbytes, wait_s=5)  # type: ignore[attr-defined]

        waiting = asyncio.ensure_future(grow(younger, 50))  # 60 + 50 > 100: waits
        await settle()
        assert not waiting.done() and younger.held == 0
        buf.close(oldest)  # room: the younger one gets it
        await asyncio.wait_for(waiting, 5)
        assert younger.held == 50

        # Now the younger waits again, and gives up as soon as the oldest has to wait.
        oldest2, young2 = buf.open(), buf.open()
        assert buf._oldest() is younger
        await oldest2.need(30, wait_s=5)  # 80 held
        young_waits = asyncio.ensure_future(grow(young2, 30))
        await settle()
        assert not young_waits.done()
        oldest_waits = asyncio.ensure_future(grow(younger, 75))  # the oldest needs 25 more
        with pytest.raises(Busy, match="an older upload is waiting for room"):
            await asyncio.wait_for(young_waits, 5)
        assert not oldest_waits.done()
        buf.close(oldest2)
        await asyncio.wait_for(oldest_waits, 5)
        assert younger.held == 75 and buf.used == 75

    asyncio.run(main())


def test_the_oldest_upload_gets_busy_if_no_room_comes_in_time() -> None:
    async def main() -> None:
        buf = UploadBuffer(100)
        oldest, younger = buf.open(), buf.open()
        await younger.need(60, wait_s=1)
        with pytest.raises(Busy, match="stayed full for 0.05 s"):
            await oldest.need(60, wait_s=0.05)
        assert (buf.used, oldest.held) == (60, 0)

    asyncio.run(main())


def test_a_body_larger_than_the_whole_buffer_is_refused_at_once() -> None:
    async def main() -> None:
        buf = UploadBuffer(100)
        with pytest.raises(PayloadTooLarge, match="exceeds the upload buffer of 100 bytes"):
            await buf.open().need(101, wait_s=5)
        assert buf.used == 0

    asyncio.run(main())


def test_limits_refuse_beyond_max_uploads_at_once_and_release_on_exit() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=1, buffer_bytes=100)
        async with limits.admit("a", 10, client_bytes=100) as ticket:
            await ticket.need(10, wait_s=5)
            assert (limits.inflight, limits.buffer.used) == (1, 10)
            with pytest.raises(Busy, match="1 uploads are in flight"):
                async with limits.admit("b", 10, client_bytes=100):
                    raise AssertionError("admitted beyond max_uploads")
            assert (limits.inflight, limits.buffer.used) == (1, 10)
        assert (limits.inflight, limits.buffer.used, limits.clients) == (0, 0, {})

    asyncio.run(main())


def test_one_client_holds_at_most_its_slots_and_one_full_share() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=100, buffer_bytes=1000, client_uploads=2)
        async with limits.admit("greedy", 10, client_bytes=50):
            async with limits.admit("greedy", 10, client_bytes=50):
                with pytest.raises(Busy, match="already has 2 uploads in flight") as slots:
                    async with limits.admit("greedy", 10, client_bytes=50):
                        raise AssertionError("a third slot")
                assert slots.value.retry_after_s == 1
                async with limits.admit("honest", 10, client_bytes=50):  # others unaffected
                    assert limits.inflight == 3
            assert limits.clients["greedy"] == (1, 10)
            with pytest.raises(Busy, match="would exceed one full share"):
                async with limits.admit("greedy", 41, client_bytes=50):
                    raise AssertionError("more than one full share announced")
        assert (limits.inflight, limits.clients) == (0, {})

    asyncio.run(main())


def test_limits_release_everything_when_the_body_raises_or_is_cancelled() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=4, buffer_bytes=100)
        with pytest.raises(PayloadTooLarge):
            async with limits.admit("a", 101, client_bytes=1000):
                raise AssertionError("admitted beyond the buffer")
        with pytest.raises(RuntimeError, match="handler failed"):
            async with limits.admit("a", 40, client_bytes=100) as ticket:
                await ticket.need(40, wait_s=5)
                raise RuntimeError("handler failed")
        assert (limits.inflight, limits.buffer.used, limits.clients) == (0, 0, {})

        admitted, entered, go = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def oldest_waiting() -> None:
            async with limits.admit("b", 80, client_bytes=100) as ticket:
                admitted.set()
                await go.wait()
                await ticket.need(80, wait_s=5)  # the oldest: waits for room
                raise AssertionError("room while the buffer is full")

        async def holder() -> None:
            async with limits.admit("a", 80, client_bytes=100) as ticket:
                await ticket.need(80, wait_s=5)
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        waiting = asyncio.ensure_future(oldest_waiting())
        await asyncio.wait_for(admitted.wait(), 5)
        held = asyncio.ensure_future(holder())
        await asyncio.wait_for(entered.wait(), 5)
        go.set()
        await settle()
        assert not waiting.done()
        assert limits.inflight == 2 and limits.buffer.used == 80
        for task in (waiting, held):
            task.cancel()
        await asyncio.gather(waiting, held, return_exceptions=True)
        assert (limits.inflight, limits.buffer.used, limits.clients) == (0, 0, {})

    asyncio.run(main())


def test_server_limits_come_from_the_topology() -> None:
    from mpc_agg import Topology

    doc = topology_doc(3, 1)
    doc["rounds"].update(max_concurrent_uploads=7, upload_buffer_mb=64)
    doc["deadlines"] = {"upload_s": 30}
    limits = ServerLimits.for_topology(Topology.from_dict(doc), grace_s=1.0)
    assert (limits.max_uploads, limits.buffer_bytes, limits.upload_s) == (7, 64 << 20, 30.0)
    assert (limits.grace_s, limits.client_uploads, limits.min_rate_bps) == (1.0, 2, 65536)
