"""The aggregator's admission limits: the cap on upload bytes held in memory
(``rounds.upload_buffer_mb``) and on uploads in flight (``rounds.max_concurrent_uploads``)."""

from __future__ import annotations

import asyncio

import pytest

from mpc_agg.errors import Busy, PayloadTooLarge
from mpc_agg.transport.upload_limits import UploadBuffer, UploadLimits


async def settle() -> None:
    """Let every task that can run do so until it waits (a few loop iterations)."""
    for _ in range(10):
        await asyncio.sleep(0)


def test_upload_waits_for_room_then_proceeds() -> None:
    async def main() -> list[str]:
        buf = UploadBuffer(100)
        order: list[str] = []
        await buf.reserve(70, wait_s=5)

        async def second() -> None:
            await buf.reserve(50, wait_s=5)  # 70 + 50 > 100: waits
            order.append("second reserved")

        task = asyncio.ensure_future(second())
        await settle()
        assert not task.done() and buf.used == 70
        order.append("first released")
        await buf.release(70)
        await asyncio.wait_for(task, 5)
        assert buf.used == 50
        return order

    assert asyncio.run(main()) == ["first released", "second reserved"]


def test_upload_that_never_fits_in_time_is_busy_and_holds_nothing() -> None:
    async def main() -> int:
        buf = UploadBuffer(100)
        await buf.reserve(60, wait_s=1)
        with pytest.raises(Busy, match="stayed full for 0.1 s"):
            await buf.reserve(60, wait_s=0.1)
        return buf.used

    assert asyncio.run(main()) == 60


def test_upload_larger_than_the_whole_buffer_is_refused_at_once() -> None:
    async def main() -> None:
        buf = UploadBuffer(100)
        with pytest.raises(PayloadTooLarge, match="exceeds the upload buffer of 100 bytes"):
            await buf.reserve(101, wait_s=5)
        assert buf.used == 0

    asyncio.run(main())


def test_limits_refuse_beyond_max_uploads_at_once_and_release_on_exit() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=1, buffer_bytes=100)
        async with limits.admit(10, wait_s=5):
            assert (limits.inflight, limits.buffer.used) == (1, 10)
            with pytest.raises(Busy, match="1 uploads are in flight"):
                async with limits.admit(10, wait_s=5):
                    raise AssertionError("admitted beyond max_uploads")
            assert (limits.inflight, limits.buffer.used) == (1, 10)
        assert (limits.inflight, limits.buffer.used) == (0, 0)

    asyncio.run(main())


def test_limits_release_the_slot_when_the_buffer_refuses_or_the_body_raises() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=4, buffer_bytes=100)
        with pytest.raises(PayloadTooLarge):
            async with limits.admit(101, wait_s=5):
                raise AssertionError("admitted beyond the buffer")
        assert (limits.inflight, limits.buffer.used) == (0, 0)
        with pytest.raises(RuntimeError, match="handler failed"):
            async with limits.admit(40, wait_s=5):
                raise RuntimeError("handler failed")
        assert (limits.inflight, limits.buffer.used) == (0, 0)

    asyncio.run(main())


def test_limits_release_on_cancellation_while_waiting_for_room() -> None:
    async def main() -> None:
        limits = UploadLimits(max_uploads=4, buffer_bytes=100)
        entered = asyncio.Event()

        async def holder() -> None:
            async with limits.admit(80, wait_s=5):
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        async def waiter() -> None:
            async with limits.admit(80, wait_s=5):
                raise AssertionError("admitted while the buffer is full")

        held = asyncio.ensure_future(holder())
        await asyncio.wait_for(entered.wait(), 5)
        waiting = asyncio.ensure_future(waiter())
        await settle()
        assert limits.inflight == 2 and limits.buffer.used == 80
        for task in (waiting, held):
            task.cancel()
        await asyncio.gather(waiting, held, return_exceptions=True)
        assert (limits.inflight, limits.buffer.used) == (0, 0)

    asyncio.run(main())
