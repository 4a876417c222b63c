"""Logging what peers do wrong without letting them write the log (README, "Security
model": hostile input).

:func:`clip` cuts and escapes a peer's text before it goes into a log line (no newlines, no
control characters, at most ``limit`` characters). :class:`RateLimitedLog` logs at most
``per_minute`` lines per key (an error code) from a token bucket and counts the rest; the
next line of that key says how many were suppressed. ``/metrics`` counts every refusal, so
nothing is lost but repetition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog", "clip"]

MAX_KEYS = 256
"""Keys tracked at most; further ones share the bucket ``"other"``."""


def clip(value: object, limit: int = 100) -> str:
    """``value`` as text fit for a log line: control characters escaped, at most ``limit``
    characters of it, then how many were left out."""
    text = str(value)
    head = text[:limit]
    safe = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in head)
    if len(text) > limit:
        safe += f"...(+{len(text) - limit} chars)"
    return safe


class RateLimitedLog:
    """A logger that writes at most ``per_minute`` lines per key (token bucket: bursts of
    ``per_minute``, refilled evenly over a minute); ``clock`` is injectable for tests."""

    def __init__(
        self,
        logger: logging.Logger,
        per_minute: int = 10,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.per_minute = max(1, per_minute)
        self.clock = clock
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, last refill, suppressed]

    def suppressed(self, key: str) -> int:
        """Lines of ``key`` suppressed since its last line."""
        bucket = self._buckets.get(key)
        return 0 if bucket is None else int(bucket[2])

    def log(
        self,
        key: str,
        level: int,
        msg: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its rate; True if logged."""
        if key not in self._buckets and len(self._buckets) >= MAX_KEYS:
            key = "other"
        now = self.clock()
        bucket = self._buckets.setdefault(key, [float(self.per_minute), now, 0.0])
        bucket[0] = min(
            float(self.per_minute), bucket[0] + (now - bucket[1]) * self.per_minute / 60.0
        )
        bucket[1] = now
        if bucket[0] < 1.0:
            bucket[2] += 1
            return False
        bucket[0] -= 1.0
        if bucket[2]:
            msg += " [%d similar line(s) suppressed]"
            args = (*args, int(bucket[2]))
            bucket[2] = 0
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True
