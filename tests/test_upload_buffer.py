"""The aggregator's cap on upload bytes held in memory (``rounds.upload_buffer_mb``)."""

from __future__ import annotations

import asyncio

import pytest

from mpc_agg.errors import Busy, PayloadTooLarge
from mpc_agg.transport.http_server import UploadBuffer


def test_upload_waits_for_room_then_proceeds() -> None:
    async def main() -> list[str]:
        buf = UploadBuffer(100)
        order: list[str] = []
        await buf.reserve(70, wait_s=5)

        async def second() -> None:
            await buf.reserve(50, wait_s=5)  # 70 + 50 > 100: waits
            order.append("second reserved")

        task = asyncio.ensure_future(second())
        await asyncio.sleep(0.05)
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
