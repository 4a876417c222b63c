"""Units, plain-text tables and progress lines of the benchmark (pure, no I/O but stderr).

README, "Cost model and performance": every figure is printed with its unit, and a ratio is
"mpc_agg / baseline" for the same work measured in the same run.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence
from typing import IO

MB = 10**6
GB = 10**9


def fmt_dim(d: int) -> str:
    """``10000`` -> ``"1e4"``; other integers as they are."""
    if d >= 10 and 10 ** round(math.log10(d)) == d:
        return f"1e{round(math.log10(d))}"
    return str(d)


def parse_count(text: str) -> int:
    """``"1e5"``, ``"100000"`` or ``"100_000"`` -> 100000; raises ValueError otherwise."""
    value = float(text.replace("_", ""))
    if not value.is_integer() or value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return int(value)


def fmt_seconds(s: float | None) -> str:
    """A duration in seconds, with a unit that keeps 3 significant figures."""
    if s is None or not math.isfinite(s):
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1.0:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float | None) -> str:
    """A size in bytes as MB or GB (decimal units)."""
    if n is None:
        return "n/a"
    if n >= GB:
        return f"{n / GB:.2f} GB"
    return f"{n / MB:.1f} MB"


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or not baseline > 0:
        return None
    return value / baseline


def fmt_ratio(r: float | None) -> str:
    """A ratio as ``"2.31x"`` (``"n/a"`` when unknown)."""
    if r is None or not math.isfinite(r):
        return "n/a"
    if r >= 100:
        return f"{r:.0f}x"
    return f"{r:.2f}x" if r < 10 else f"{r:.1f}x"


def fmt_rate(x: float | None) -> str:
    """A rate (per second) with about 3 significant figures, without exponents."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def format_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    out = [title, rule, line(headers), rule, *(line(r) for r in rows), rule]
    return "\n".join(out)


def one_line(text: str, limit: int = 240) -> str:
    """A message on one line: its first line and, if it has more, its last one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    out = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return out if len(out) <= limit else out[: limit - 3] + "..."


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


class Progress:
    """Progress on stderr: a line per step, and in-place counters on a terminal (every 25 %
    otherwise). Every line starts with the time elapsed since the bench started."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self._partial = False

    def _prefix(self) -> str:
        return f"[{time.perf_counter() - self.started:7.1f} s]"

    def line(self, message: str) -> None:
        """Print one progress line."""
        if self._partial:
            self.stream.write("\n")
            self._partial = False
        self.stream.write(f"{self._prefix()} {message}\n")
        self.stream.flush()

    def count(self, message: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` (redrawn in place on a terminal)."""
        if self.tty:
            self.stream.write(f"\r{self._prefix()} {message} {done}/{total}\x1b[K")
            self._partial = done < total
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
        elif total >= 20 and (4 * done // total) != (4 * (done - 1) // total):
            self.line(f"{message} {done}/{total}")
