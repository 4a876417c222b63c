"""What an aggregator admits of uploads at once: a count in flight and bytes held in memory.

README, "HTTP API (per aggregator)" and the ``rounds`` section of "Topology files": uploads
beyond ``rounds.max_concurrent_uploads`` in flight are answered 503 ``busy`` at once; an
upload whose announced length does not fit in the upload buffer (``rounds.upload_buffer_mb``)
waits for room, held back by TCP flow control, and gets 503 ``busy`` if none comes within
``deadlines.upload_s``. Together they keep an aggregator's memory O(d) whatever the number of
clients uploading (docs/design.md, "A round, step by step", step 2).

Pure asyncio, no HTTP: :mod:`mpc_agg.transport.http_server` holds one :class:`UploadLimits`
per application.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mpc_agg.errors import Busy, PayloadTooLarge

__all__ = ["UploadBuffer", "UploadLimits"]


class UploadBuffer:
    """Bytes of upload bodies held in memory at once at one aggregator, with a cap.

    An upload reserves its announced length before its body is read; one that does not fit
    waits (its client is held back by TCP flow control) and gets :class:`Busy` if room does
    not come within the wait. Keeps an aggregator's memory O(d) whatever the number of
    clients uploading.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Condition()

    async def reserve(self, nbytes: int, wait_s: float) -> None:
        """Hold ``nbytes`` of the buffer; :class:`PayloadTooLarge` if they can never fit,
        :class:`Busy` if they do not fit within ``wait_s`` seconds (nothing held then)."""
        if nbytes > self.capacity:
            raise PayloadTooLarge(
                f"body of {nbytes} bytes exceeds the upload buffer of {self.capacity} bytes"
            )
        async with self._freed:
            try:
                await asyncio.wait_for(
                    self._freed.wait_for(lambda: self.used + nbytes <= self.capacity), wait_s
                )
            except asyncio.TimeoutError:
                raise Busy(
                    f"the upload buffer ({self.capacity >> 20} MiB) stayed full for "
                    f"{wait_s:g} s; retry later"
                ) from None
            self.used += nbytes

    async def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` reserved with :meth:`reserve` and wake the waiters."""
        self.used -= nbytes  # at once: a cancellation while waiting for the lock loses nothing
        async with self._freed:
            self._freed.notify_all()


class UploadLimits:
    """The two admission limits of one aggregator: at most ``max_uploads`` uploads in
    flight (receiving or processing their body), and their bodies within an
    :class:`UploadBuffer` of ``buffer_bytes``."""

    def __init__(self, max_uploads: int, buffer_bytes: int) -> None:
        self.max_uploads = max_uploads
        self.inflight = 0
        """Uploads admitted and not yet finished."""
        self.buffer = UploadBuffer(buffer_bytes)

    @asynccontextmanager
    async def admit(self, nbytes: int, wait_s: float) -> AsyncIterator[None]:
        """Hold one upload slot and ``nbytes`` of the buffer for the body of the ``with``.

        :class:`Busy` at once when ``max_uploads`` are in flight; otherwise as
        :meth:`UploadBuffer.reserve` (the slot is given back if that raises). Both are
        released however the body ends, cancellation included.
        """
        if self.inflight >= self.max_uploads:
            raise Busy(f"{self.max_uploads} uploads are in flight at this aggregator; retry later")
        self.inflight += 1
        try:
            await self.buffer.reserve(nbytes, wait_s)
            try:
                yield
            finally:
                await self.buffer.release(nbytes)
        finally:
            self.inflight -= 1
