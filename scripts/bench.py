#!/usr/bin/env python
"""Benchmark mpc_agg on this machine, next to plaintext baselines measured in the same run.

    python scripts/bench.py                      # every section, full grid (8 min here)
    python scripts/bench.py --quick              # smoke run: d in {1e4, 1e5}, 10 clients
    python scripts/bench.py --only reveal,grid --json bench.json

Sections (``--only`` selects some, in this order):

client   ``Client.prepare`` (clip + encode + shard + serialise: everything a client does
         before uploading) per vector, with its parts, against numpy adding the same float64
         vector into a float64 accumulator.
ingest   the aggregator's upload path in process (``Aggregator.receive_share_async``, or
         ``receive_share`` where there is no async one; no HTTP, no MPC) for full-share bodies
         (8 d bytes) and seed-share bodies (16-byte seed, expanded by the aggregator), journal
         fsync on and off, 1 or 4 uploads in flight, against the same numpy add; plus
         ``core.xof.expand`` alone.
reveal   a real 3-party federation (``LocalFederation`` on free loopback ports, fsync as in
         the base config), 2 clients per round: reveal latency from the leader's timings and
         the collector's close -> result wall time, in µs per element to show linearity in d.
grid     end-to-end rounds (open -> every upload -> aggregate returns) over clients x d,
         uploads ``--concurrency`` at a time, vectors generated per client from a seed (never
         all held at once); baselines over the very same vectors: a plaintext numpy sum (adds
         only) and a plaintext HTTP aggregation (one aiohttp server process adding raw float64
         bodies, same concurrency: the floor for this architecture; both wall times include
         generating the vectors, reported apart in the JSON); peak RSS of every
         aggregator process against the target 4 x d x 8 B + 200 MB. Cells estimated to take
         longer than ``--cell-budget-s`` (from the per-client time of cells already run) or
         that cannot fit in memory or on disk are skipped, saying why; the must-complete cells
         10 x 1e7 and 1000 x 1e5 always run when selected.
flower   Flower SecAgg+ (``scripts/flower_secaggplus.py``: SecAggPlusWorkflow + secaggplus_mod)
         on clients {10, 100} x d {1e4, 1e5, 1e6}, each under ``--flower-timeout-s``; its time
         (the script's "seconds": the round, without start-up and data generation) is put
         next to the matching grid cell.

A *ratio* is always "mpc_agg time / baseline time" for the same work measured in this run
(2.0x: mpc_agg takes twice as long), except Flower's, which is "Flower time / mpc_agg time"
(10x: mpc_agg is ten times faster). Progress goes to stderr, tables to stdout (each section's
table as it completes, then the grid with Flower and the targets), ``--json PATH`` writes every
raw figure and the machine's description. Exit status: 0 (skipped cells included), 1 when a
round fails or a revealed total is wrong, 2 on bad options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from mpc_agg import Client, Collector, MpcAggError, Topology  # noqa: E402
from mpc_agg.core import codec, field, xof  # noqa: E402
from mpc_agg.core.sharing import Share, ShareKind, shard  # noqa: E402
from mpc_agg.launcher import LaunchError, LocalFederation, free_loopback_ports  # noqa: E402

SECTIONS = ("client", "ingest", "reveal", "grid", "flower")
FULL_DIMS = (10**4, 10**5, 10**6, 10**7)
FULL_CLIENTS = (10, 100, 1000)
QUICK_DIMS = (10**4, 10**5)
QUICK_CLIENTS = (10,)
MUST_RUN = ((10, 10**7), (1000, 10**5))
"""Grid cells that must complete on this machine (issue 5): never skipped for time."""
FLOWER_CLIENTS = (10, 100)
FLOWER_DIMS = (10**4, 10**5, 10**6)
REVEAL_CLIENTS = 2
DEFAULT_CONFIG = ROOT / "configs" / "local-3.yaml"
FLOWER_SCRIPT = ROOT / "scripts" / "flower_secaggplus.py"
FLOWER_KEYS = ("seconds", "max_abs_error", "num_shares", "reconstruction_threshold", "flwr_version")

MB = 10**6
GB = 10**9
RSS_TARGET_WORDS = 4
"""Target: an aggregator's peak RSS <= RSS_TARGET_WORDS x d x 8 bytes + RSS_TARGET_BASE."""
RSS_TARGET_BASE = 200 * MB
MEMORY_HEADROOM = 0.8
"""Fraction of the available memory (or free disk) a grid cell may plan to use."""
CLIENT_COPIES = 10
"""Vector-sized buffers a client holds while preparing an upload (vector, encoding
temporaries, shares, bodies): an upper bound used to plan memory."""


# -- pure helpers: formatting --------------------------------------------------------------


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


# -- pure helpers: memory, planning, parsing -------------------------------------------------


def parse_proc_status(text: str) -> dict[str, int]:
    """Fields of a ``/proc/<pid>/status`` text given in kB (VmHWM, VmRSS, ...), in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def rss_target_bytes(dim: int) -> int:
    """The aggregator peak-RSS target for vectors of length ``dim``: 4 x d x 8 B + 200 MB."""
    return RSS_TARGET_WORDS * dim * 8 + RSS_TARGET_BASE


def cell_memory_bytes(dim: int, m: int, concurrency: int) -> int:
    """Memory a grid cell may need at once (bytes): ``concurrency`` clients preparing uploads,
    ``m`` aggregators at 1.5 x their RSS target, the plaintext server and numpy baselines."""
    clients = concurrency * CLIENT_COPIES * 8 * dim
    aggregators = m * rss_target_bytes(dim) * 3 // 2
    baselines = (concurrency + 4) * 8 * dim
    return clients + aggregators + baselines


def cell_disk_bytes(clients: int, dim: int) -> int:
    """Journal bytes of a round (bytes): one full share of 8 d bytes per client, in total."""
    return clients * (8 * dim + 64)


def estimate_round_seconds(
    measured: Sequence[tuple[int, int, float]], clients: int, dim: int
) -> float | None:
    """Estimated wall time (s) of a round of ``clients`` x ``dim`` from rounds already run,
    given as ``(clients, dim, seconds)``; None when nothing comparable was measured.

    Per-client time is taken from the measured round of the same ``dim`` with the most
    clients; otherwise from the largest smaller ``dim``, scaled linearly in d (an upper bound,
    since per-client overheads do not grow with d).
    """
    same = [(c, s) for c, d, s in measured if d == dim and c > 0]
    if same:
        c, s = max(same)
        return clients * s / c
    smaller = [(d, c, s) for c, d, s in measured if d < dim and c > 0]
    if not smaller:
        return None
    d, c, s = max(smaller)
    return clients * (s / c) * (dim / d)


@dataclass(frozen=True)
class CellPlan:
    """Whether to run a grid cell, and why not. ``estimate_s``: expected round time (s)."""

    clients: int
    dim: int
    run: bool
    reason: str | None
    estimate_s: float | None
    must_run: bool


def plan_cell(
    clients: int,
    dim: int,
    *,
    estimate_s: float | None,
    budget_s: float,
    memory_bytes: int,
    available_memory_bytes: int | None,
    disk_bytes: int,
    free_disk_bytes: int | None,
    must_run: bool,
) -> CellPlan:
    """Decide on one grid cell. A cell that cannot fit (memory, disk) is always skipped;
    one estimated over ``budget_s`` is skipped unless it is a must-run cell."""
    reasons = []
    if available_memory_bytes is not None and memory_bytes > available_memory_bytes:
        reasons.append(
            f"needs about {fmt_bytes(memory_bytes)} of memory, "
            f"{fmt_bytes(available_memory_bytes)} usable"
        )
    if free_disk_bytes is not None and disk_bytes > free_disk_bytes:
        reasons.append(
            f"journals need {fmt_bytes(disk_bytes)} of disk, {fmt_bytes(free_disk_bytes)} usable"
        )
    if not must_run and estimate_s is not None and estimate_s > budget_s:
        reasons.append(
            f"estimated {estimate_s:.0f} s > cell budget {budget_s:.0f} s "
            "(from the per-client time of smaller cells)"
        )
    return CellPlan(
        clients,
        dim,
        run=not reasons,
        reason="; ".join(reasons) or None,
        estimate_s=estimate_s,
        must_run=must_run,
    )


def one_line(text: str, limit: int = 240) -> str:
    """A message on one line: its first line and, if it has more, its last one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    out = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return out if len(out) <= limit else out[: limit - 3] + "..."


def parse_last_json_line(stdout: str) -> dict[str, Any] | None:
    """The JSON object on the last non-empty line of ``stdout``, or None."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        obj = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_sections(text: str) -> tuple[str, ...]:
    """``"grid,client"`` -> the named sections in run order; raises ValueError on a bad name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise ValueError(
            f"unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}"
        )
    return tuple(s for s in SECTIONS if s in names)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def verdict(ok: bool | None) -> str:
    """``"met"``, ``"NOT met"`` or ``"n/a"`` (None: not measured)."""
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def reference_row(rows: Sequence[dict[str, Any]], dim: int = 10**6) -> dict[str, Any] | None:
    """The row measured at ``dim``, else the one with the largest dimension (None if empty)."""
    if not rows:
        return None
    exact = [r for r in rows if r["dim"] == dim]
    return exact[0] if exact else max(rows, key=lambda r: r["dim"])


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the figures in ``results`` (the JSON document's sections).

    Each entry: ``target`` (text), ``value`` (formatted measurement), ``verdict``.
    """
    out: list[dict[str, Any]] = []

    def add(target: str, value: str, ok: bool | None) -> None:
        out.append({"target": target, "value": value, "verdict": verdict(ok)})

    ingest = results.get("ingest", [])
    for fsync, inflight in INGEST_CASES:
        rows = [
            r
            for r in ingest
            if r["kind"] == "full" and r["fsync"] is fsync and r.get("inflight", 1) == inflight
        ]
        ref = reference_row(rows)
        r = ref["ratio_vs_numpy"] if ref else None
        where = f"d={fmt_dim(ref['dim'])}, " if ref else ""
        add(
            f"full-share ingest <= 3x numpy add ({where}fsync {'on' if fsync else 'off'}, "
            f"{inflight} in flight)",
            fmt_ratio(r),
            None if r is None else r <= 3.0,
        )
    ref = reference_row(results.get("seed_expansion", []), dim=10**7)
    gbps = ref["gbps"] if ref else None
    add(
        "seed expansion >= 1 GB/s per core" + (f" (d={fmt_dim(ref['dim'])})" if ref else ""),
        "n/a" if gbps is None else f"{gbps:.2f} GB/s",
        None if gbps is None else gbps >= 1.0,
    )
    worst: tuple[float, dict[str, Any]] | None = None
    for cell in results.get("grid", []):
        peaks = [p for p in cell.get("aggregator_peak_rss_bytes") or [] if p]
        if cell.get("status") == "ok" and peaks:
            q = max(peaks) / rss_target_bytes(cell["dim"])
            if worst is None or q > worst[0]:
                worst = (q, cell)
    add(
        "aggregator peak RSS <= 4*d*8 B + 200 MB (worst cell)",
        "n/a"
        if worst is None
        else f"{fmt_ratio(worst[0])} of target at {worst[1]['clients']} x "
        f"{fmt_dim(worst[1]['dim'])}",
        None if worst is None else worst[0] <= 1.0,
    )
    reveal = {r["dim"]: r for r in results.get("reveal", []) if r.get("reveal_s") is not None}
    r6 = reveal.get(10**6)
    add(
        "reveal of d=1e6 among 3 parties <= 1 s",
        fmt_seconds(r6["reveal_s"]) if r6 else "n/a",
        None if r6 is None else r6["reveal_s"] <= 1.0,
    )
    per_elt = [r["us_per_element"] for d, r in reveal.items() if d >= 10**5]
    spread = max(per_elt) / min(per_elt) if len(per_elt) >= 2 and min(per_elt) > 0 else None
    add(
        "reveal linear in d (max/min µs per element, d >= 1e5, within 2x)",
        fmt_ratio(spread),
        None if spread is None else spread <= 2.0,
    )
    cells = {(c["clients"], c["dim"]): c for c in results.get("grid", [])}
    c = cells.get((100, 10**6))
    ok_cell = c is not None and c.get("status") == "ok"
    r_http = c.get("ratio_vs_http") if ok_cell and c else None
    add(
        "e2e 100 x 1e6 <= 2x plaintext HTTP",
        fmt_ratio(r_http),
        None if r_http is None else r_http <= 2.0,
    )
    r_fl = c.get("flower_ratio") if ok_cell and c else None
    add(
        "e2e 100 x 1e6 >= 10x faster than Flower SecAgg+",
        fmt_ratio(r_fl),
        None if r_fl is None else r_fl >= 10.0,
    )
    for clients, dim in MUST_RUN:
        cell = cells.get((clients, dim))
        status = None if cell is None else cell.get("status")
        value = "not selected" if cell is None else str(status)
        if status == "ok":
            value = f"ok in {fmt_seconds(cell['round_s'])}"
        add(
            f"round of {clients} x {fmt_dim(dim)} completes",
            value,
            None if cell is None else status == "ok",
        )
    return out


# -- progress -----------------------------------------------------------------------------------


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


# -- processes, memory ------------------------------------------------------------------------


def die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the bench dies (Linux), so nothing outlives it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM a process this bench started (by its pid), then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class PeakRss:
    """Peak resident set size (bytes) of process ``pid`` between :meth:`reset` and :meth:`peak`.

    Uses the kernel's high-water mark (``echo 5 > /proc/<pid>/clear_refs`` resets VmHWM);
    where that is not allowed, samples the RSS with psutil every 20 ms.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.method = "VmHWM"
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status(self) -> dict[str, int]:
        try:
            return parse_proc_status(Path(f"/proc/{self.pid}/status").read_text())
        except OSError:
            return {}

    def current(self) -> int | None:
        """The current RSS in bytes (None if unknown)."""
        rss = self._status().get("VmRSS")
        if rss is None:
            with contextlib.suppress(Exception):
                import psutil

                rss = int(psutil.Process(self.pid).memory_info().rss)
        return rss

    def reset(self) -> None:
        """Start a new interval."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.method = "VmHWM"
            return
        except OSError:
            self.method = "sampled"
        self._stop.clear()
        self._samples = []

        def sample() -> None:
            while not self._stop.wait(0.02):
                rss = self.current()
                if rss is not None:
                    self._samples.append(rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def peak(self) -> int | None:
        """The peak RSS since :meth:`reset` in bytes (None if unknown)."""
        if self.method == "VmHWM":
            return self._status().get("VmHWM")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return max(self._samples) if self._samples else None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (or psutil), in bytes."""
    with contextlib.suppress(OSError):
        fields = parse_proc_status(Path("/proc/meminfo").read_text())
        if "MemAvailable" in fields:
            return fields["MemAvailable"]
    with contextlib.suppress(Exception):
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def version_of(dist: str) -> str | None:
    """Installed version of distribution ``dist`` (None if absent)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_describe() -> dict[str, Any]:
    """The checkout's commit and whether it has local changes (benchmarks of a moving tree)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty)}


def machine_info() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    mem = None
    with contextlib.suppress(OSError):
        mem = parse_proc_status(Path("/proc/meminfo").read_text()).get("MemTotal")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_total_bytes": mem,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": {
            name: version_of(name)
            for name in ("numpy", "mpyc", "aiohttp", "cryptography", "gmpy2", "flwr", "psutil")
        },
        "git": git_describe(),
    }


# -- measurement helpers --------------------------------------------------------------------


def repeat_timed(
    fn: Callable[[], object], *, min_total_s: float, min_reps: int = 3, max_reps: int = 1000
) -> list[float]:
    """Call ``fn`` until ``min_total_s`` seconds and ``min_reps`` calls (at most ``max_reps``);
    the duration of each call in seconds."""
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_total_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def numpy_add_seconds(dim: int, min_total_s: float) -> float:
    """Median time (s) of ``np.add(acc, x, out=acc)`` for float64 vectors of length ``dim``:
    the plaintext baseline of one client's contribution."""
    x = np.random.default_rng(0).uniform(-1.0, 1.0, dim)
    acc = np.zeros(dim)
    np.add(acc, x, out=acc)  # first touch of the pages outside the timing
    return median(repeat_timed(lambda: np.add(acc, x, out=acc), min_total_s=min_total_s))


def client_vector(seed: int, index: int, dim: int) -> np.ndarray:
    """Client ``index``'s float64 vector of length ``dim``, uniform in [-1, 1): generated
    on the fly from ``(seed, index)``, identically for mpc_agg and both baselines."""
    return np.random.default_rng((seed, index)).uniform(-1.0, 1.0, dim)


def client_name(index: int) -> str:
    """The id of simulated client ``index``."""
    return f"client-{index:05d}"


# -- section: client ------------------------------------------------------------------------


def client_row(topology: Topology, dim: int, min_total_s: float) -> dict[str, Any]:
    """One d of the client section: times in seconds (medians over repetitions)."""
    x = client_vector(1, 0, dim)
    client = Client(topology, "bench-client")
    rng = np.random.default_rng()
    reps = 1 if dim >= 10**7 else 3
    prepare = repeat_timed(
        lambda: client.prepare("bench-round", x), min_total_s=min_total_s, min_reps=reps
    )
    encoded = topology.encoding.encode(x, rng)
    encode = repeat_timed(
        lambda: topology.encoding.encode(x, rng), min_total_s=min_total_s / 3, min_reps=reps
    )
    shares = shard(encoded, "bench-round", "bench-client", topology.m)
    sharding = repeat_timed(
        lambda: shard(encoded, "bench-round", "bench-client", topology.m),
        min_total_s=min_total_s / 3,
        min_reps=reps,
    )
    serialise = repeat_timed(
        lambda: [codec.encode_share(s) for s in shares],
        min_total_s=min_total_s / 3,
        min_reps=reps,
    )
    base = numpy_add_seconds(dim, min_total_s / 3)
    t = median(prepare)
    return {
        "dim": dim,
        "reps": len(prepare),
        "prepare_s": t,
        "encode_s": median(encode),
        "shard_s": median(sharding),
        "serialise_s": median(serialise),
        "numpy_add_s": base,
        "ratio_vs_numpy": ratio(t, base),
        "vector_gbps": 8 * dim / t / GB,
    }


def bench_client(
    topology: Topology, dims: Sequence[int], min_total_s: float, progress: Progress
) -> list[dict[str, Any]]:
    """Per d: ``Client.prepare`` time per vector and its parts (clip+encode, shard,
    serialise), against the numpy add of the same float64 vector."""
    rows = []
    for dim in dims:
        progress.line(f"client: d = {fmt_dim(dim)}")
        rows.append(client_row(topology, dim, min_total_s))
    return rows


def client_table(rows: Sequence[dict[str, Any]]) -> str:
    return format_table(
        "client: encode + shard per vector (Client.prepare), vs numpy float64 add",
        ["d", "prepare", "clip+encode", "shard", "serialise", "GB/s", "numpy add", "ratio"],
        [
            [
                fmt_dim(r["dim"]),
                fmt_seconds(r["prepare_s"]),
                fmt_seconds(r["encode_s"]),
                fmt_seconds(r["shard_s"]),
                fmt_seconds(r["serialise_s"]),
                f"{r['vector_gbps']:.3f}",
                fmt_seconds(r["numpy_add_s"]),
                fmt_ratio(r["ratio_vs_numpy"]),
            ]
            for r in rows
        ],
    )


# -- section: ingest ------------------------------------------------------------------------


class NullNetwork:
    """A :class:`~mpc_agg.mpc.network.PartyNetwork` without peers: ingest makes no MPC call."""

    def __init__(self, pid: int, m: int) -> None:
        self.pid = pid
        self.m = m
        self.broken = asyncio.Event()
        self.connected = True

    def missing(self) -> list[int]:
        return []

    async def start(self) -> None:
        pass

    async def reconnect(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def broadcast(self, obj: Any, sender: int) -> Any:
        raise RuntimeError("the ingest benchmark makes no MPC call")

    async def exchange(self, obj: Any) -> list[Any]:
        raise RuntimeError("the ingest benchmark makes no MPC call")

    async def joint_binomial_sum(self, local_sum: Any, trials: int) -> Any:
        raise RuntimeError("the ingest benchmark makes no MPC call")


async def receive(agg: Any, round_id: str, client_id: str, body: bytes) -> bool:
    """The aggregator's upload path, sync or async (``receive_share_async`` if it exists)."""
    fn = getattr(agg, "receive_share_async", None) or agg.receive_share
    out = fn(round_id, client_id, body)
    if inspect.isawaitable(out):
        out = await out
    return bool(out)


def topology_document(base: dict[str, Any], data_dir: Path, *, fsync: bool | None = None) -> dict:
    """``base`` (a parsed topology YAML) on fresh loopback ports, with ``data_dir``, room for
    1000 clients x 1e7 and, if given, ``fsync``."""
    doc = json.loads(json.dumps(base))  # deep copy of plain YAML data
    m = len(doc["aggregators"])
    ports = free_loopback_ports(2 * m)
    doc["name"] = "bench"
    doc["aggregators"] = [
        {"host": "127.0.0.1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]}
        for i in range(m)
    ]
    rounds = dict(doc.get("rounds") or {})
    rounds["max_dim"] = max(int(rounds.get("max_dim", 0)), max(FULL_DIMS))
    rounds["max_clients"] = max(int(rounds.get("max_clients", 0)), max(FULL_CLIENTS) + 10)
    doc["rounds"] = rounds
    doc["data_dir"] = str(data_dir)
    if fsync is not None:
        doc["fsync"] = fsync
    return doc


async def ingest_times(
    topology: Topology,
    dim: int,
    full_bodies: Sequence[bytes] | None,
    min_total_s: float,
    inflight: int,
) -> tuple[list[float], float]:
    """Uploads accepted by a fresh aggregator 0, ``inflight`` at a time, one distinct client
    each (the ``full_bodies`` in turn, or with None a new seed share per client), until
    ``min_total_s`` has passed: (seconds per upload, wall seconds of them all)."""
    from mpc_agg.aggregator import Aggregator

    agg = Aggregator(topology, 0, NullNetwork(0, topology.m))
    agg.open_round("ingest", dim)
    latencies: list[float] = []
    started = time.perf_counter()
    issued = 0

    def more() -> bool:
        elapsed = time.perf_counter() - started
        return issued < 300 and (issued < 3 * inflight or elapsed < min_total_s)

    async def worker() -> None:
        nonlocal issued
        while more():
            i = issued
            issued += 1
            if full_bodies is not None:
                body = full_bodies[i % len(full_bodies)]
            else:
                seed = os.urandom(xof.SEED_BYTES)
                body = codec.encode_share(Share(0, ShareKind.SEED, dim, seed=seed))
            t = time.perf_counter()
            accepted = await receive(agg, "ingest", client_name(i), body)
            latencies.append(time.perf_counter() - t)
            if not accepted:
                raise RuntimeError("ingest: the upload of a new client was taken for a retry")

    try:
        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall = time.perf_counter() - started
    finally:
        agg.close_journals()
    return latencies, wall


INGEST_CASES = ((True, 1), (False, 1), (True, 4))
"""(fsync, uploads in flight) of the ingest section, each for full and seed shares."""


def ingest_rows(
    base: dict[str, Any], workdir: Path, dim: int, min_total_s: float, progress: Progress
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One d of the ingest section: rows per (fsync, in flight, kind), and the seed
    expansion alone."""
    base_add = numpy_add_seconds(dim, min_total_s / 3)
    rng = np.random.default_rng(dim)
    full_bodies = [
        codec.encode_share(
            Share(0, ShareKind.FULL, dim, vector=rng.integers(0, field.P, dim, dtype=np.uint64))
        )
        for _ in range(2)
    ]
    rows = []
    for fsync, inflight in INGEST_CASES:
        for kind in ("full", "seed"):
            progress.line(
                f"ingest: d = {fmt_dim(dim)}, {kind} shares, fsync {'on' if fsync else 'off'}, "
                f"{inflight} in flight"
            )
            data = workdir / f"ingest-{dim}-{kind}-{int(fsync)}-{inflight}"
            topo = Topology.from_dict(topology_document(base, data, fsync=fsync))
            bodies = full_bodies if kind == "full" else None
            try:
                times, wall = asyncio.run(ingest_times(topo, dim, bodies, min_total_s, inflight))
            finally:
                shutil.rmtree(data, ignore_errors=True)
            per_client = wall / len(times)  # amortised: what throughput costs per client
            body_len = codec.share_body_length(
                ShareKind.FULL if kind == "full" else ShareKind.SEED, dim
            )
            rows.append(
                {
                    "dim": dim,
                    "kind": kind,
                    "fsync": fsync,
                    "inflight": inflight,
                    "clients": len(times),
                    "wall_s": wall,
                    "latency_s": median(times),
                    "per_client_s": per_client,
                    "clients_per_s": 1.0 / per_client,
                    "body_bytes": body_len,
                    "body_gbps": body_len / per_client / GB,
                    "vector_gbps": 8 * dim / per_client / GB,
                    "numpy_add_s": base_add,
                    "ratio_vs_numpy": ratio(per_client, base_add),
                }
            )
    seed, context = os.urandom(xof.SEED_BYTES), xof.share_context("r", "c", 1)
    t = median(repeat_timed(lambda: xof.expand(seed, context, dim), min_total_s=min_total_s / 3))
    return rows, {"dim": dim, "seconds": t, "gbps": 8 * dim / t / GB}


def bench_ingest(
    base: dict[str, Any], workdir: Path, dims: Sequence[int], min_total_s: float, progress: Progress
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per d: aggregator 0's upload path (``receive_share_async`` if it exists, else
    ``receive_share``) for full and seed bodies of distinct clients, fsync on and off, one or
    several in flight (clients/s, body GB/s, vs numpy add); and ``xof.expand`` alone (GB/s)."""
    rows: list[dict[str, Any]] = []
    expansion: list[dict[str, Any]] = []
    for dim in dims:
        more, expand = ingest_rows(base, workdir, dim, min_total_s, progress)
        rows += more
        expansion.append(expand)
    return rows, expansion


def fmt_rate(x: float | None) -> str:
    """A rate (per second) with about 3 significant figures, without exponents."""
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def ingest_table(rows: Sequence[dict[str, Any]], expansion: Sequence[dict[str, Any]]) -> str:
    table = format_table(
        "ingest: the aggregator's upload path in process (no HTTP, no MPC); per client = wall "
        "time / uploads (amortised over those in flight); GB/s of body and of the d x 8-byte "
        "vector added; ratio = per client / numpy float64 add",
        [
            "d",
            "share",
            "fsync",
            "in flight",
            "n",
            "latency",
            "per client",
            "clients/s",
            "body GB/s",
            "vec GB/s",
            "numpy add",
            "ratio",
        ],
        [
            [
                fmt_dim(r["dim"]),
                r["kind"],
                "on" if r["fsync"] else "off",
                str(r["inflight"]),
                str(r["clients"]),
                fmt_seconds(r["latency_s"]),
                fmt_seconds(r["per_client_s"]),
                fmt_rate(r["clients_per_s"]),
                fmt_rate(r["body_gbps"] if r["kind"] == "full" else None),
                fmt_rate(r["vector_gbps"]),
                fmt_seconds(r["numpy_add_s"]),
                fmt_ratio(r["ratio_vs_numpy"]),
            ]
            for r in rows
        ],
    )
    expand = format_table(
        "seed expansion alone: mpc_agg.core.xof.expand (one core; output 8 d bytes)",
        ["d", "time", "GB/s"],
        [[fmt_dim(e["dim"]), fmt_seconds(e["seconds"]), f"{e['gbps']:.2f}"] for e in expansion],
    )
    return table + "\n\n" + expand


# -- the federation -------------------------------------------------------------------------


class Federation:
    """One local federation for the reveal and grid sections, restarted if a party dies."""

    def __init__(self, base: dict[str, Any], workdir: Path, progress: Progress) -> None:
        self.base = base
        self.workdir = workdir
        self.progress = progress
        self.fed: Any = None
        self.log: IO[str] | None = None
        self.starts = 0
        self.started_pids: list[int] = []
        """Every party process started, for the record (all are stopped by :meth:`stop`)."""

    @property
    def topology(self) -> Topology:
        return self.fed.topology

    @property
    def pids(self) -> list[int]:
        return list(self.fed.pids)

    def alive(self) -> bool:
        return self.fed is not None and all(p.poll() is None for p in self.fed.processes)

    def ensure(self) -> None:
        """Start the federation, or restart it on fresh ports if a party exited."""
        if self.alive():
            return
        if self.fed is not None:
            self.progress.line("a party exited: restarting the federation")
            self.stop()
        self.starts += 1
        run_dir = self.workdir / f"federation-{self.starts}"
        run_dir.mkdir(parents=True)
        config = run_dir / "bench.yaml"
        config.write_text(yaml.safe_dump(topology_document(self.base, run_dir / "data")))
        self.log = (run_dir / "parties.log").open("w")
        self.fed = LocalFederation(config, log_level="warning", output=self.log, cwd=run_dir)
        t = time.perf_counter()
        try:
            self.fed.start()
            self.fed.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.started_pids += self.pids
        self.progress.line(
            f"federation of {self.fed.topology.m} parties ready in "
            f"{time.perf_counter() - t:.1f} s (pids {self.pids}, fsync "
            f"{'on' if self.fed.topology.fsync else 'off'}, log {run_dir / 'parties.log'})"
        )

    def stop(self) -> None:
        """Stop every party (by pid, through LocalFederation.stop)."""
        if self.fed is not None:
            self.fed.stop()
        if self.log is not None:
            self.log.close()
            self.log = None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the parties printed (warnings and errors)."""
        if self.fed is None:
            return ""
        path = Path(self.fed.cwd) / "parties.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text().splitlines()[-lines:])
        return ""


_round_counter = iter(range(10**9))


def new_round_id(kind: str) -> str:
    """A round id unique within this bench run."""
    return f"bench-{kind}-{os.getpid()}-{next(_round_counter)}"


async def mpc_round(
    topology: Topology,
    round_id: str,
    clients: int,
    dim: int,
    *,
    seed: int,
    concurrency: int,
    progress: Progress,
    label: str,
    timeout_s: float,
) -> dict[str, Any]:
    """One mpc_agg round: open, upload ``clients`` vectors (``concurrency`` in flight), then
    aggregate. Wall times in seconds; the revealed result under ``"result"``."""
    collector = Collector(topology, timeout_s=timeout_s)
    t0 = time.perf_counter()
    await collector.open_round_async(round_id, dim)
    t_open = time.perf_counter()
    gate = asyncio.Semaphore(concurrency)
    done = 0
    sent = 0

    async def one(i: int) -> None:
        nonlocal done, sent
        async with gate:
            x = client_vector(seed, i, dim)
            receipt = await Client(topology, client_name(i), timeout_s=timeout_s).submit_async(
                round_id, x
            )
            del x
        done += 1
        sent += receipt.upload_bytes
        progress.count(f"{label}: uploading", done, clients)

    await asyncio.gather(*(one(i) for i in range(clients)))
    t_uploaded = time.perf_counter()
    result = await collector.aggregate_async(round_id, timeout=timeout_s)
    t_end = time.perf_counter()
    return {
        "round_s": t_end - t0,
        "open_s": t_open - t0,
        "upload_s": t_uploaded - t_open,
        "aggregate_s": t_end - t_uploaded,
        "upload_bytes": sent,
        "result": result,
    }


# -- section: reveal ------------------------------------------------------------------------


def bench_reveal(
    federation: Federation, dims: Sequence[int], progress: Progress, timeout_s: float
) -> list[dict[str, Any]]:
    """Per d: 2-client rounds on the real federation; the leader's reveal time and the
    collector's close -> result wall time (s), and µs per element."""
    rows = []
    for dim in dims:
        reps = 3 if dim <= 10**5 else (2 if dim <= 10**6 else 1)
        runs = []
        for rep in range(reps):
            federation.ensure()
            label = f"reveal: d = {fmt_dim(dim)}, round {rep + 1}/{reps}"
            progress.line(label)
            out = asyncio.run(
                mpc_round(
                    federation.topology,
                    new_round_id("reveal"),
                    REVEAL_CLIENTS,
                    dim,
                    seed=rep,
                    concurrency=REVEAL_CLIENTS,
                    progress=progress,
                    label=label,
                    timeout_s=timeout_s,
                )
            )
            if out["result"].num_clients != REVEAL_CLIENTS:
                raise RuntimeError(
                    f"reveal round counted {out['result'].num_clients} clients, "
                    f"expected {REVEAL_CLIENTS}"
                )
            runs.append(out)
        timings = [dict(o["result"].timings) for o in runs]
        reveal_s = (
            median([t["reveal_s"] for t in timings])
            if all("reveal_s" in t for t in timings)
            else None
        )
        agree_s = (
            median([t["agree_s"] for t in timings])
            if all("agree_s" in t for t in timings)
            else None
        )
        wall = median([o["aggregate_s"] for o in runs])
        rows.append(
            {
                "dim": dim,
                "clients": REVEAL_CLIENTS,
                "reps": reps,
                "reveal_s": reveal_s,
                "agree_s": agree_s,
                "close_to_result_s": wall,
                "us_per_element": None if reveal_s is None else reveal_s / dim * 1e6,
                "wall_us_per_element": wall / dim * 1e6,
                "timings": timings,
            }
        )
    return rows


def reveal_table(rows: Sequence[dict[str, Any]]) -> str:
    return format_table(
        f"reveal: 3-party local federation, {REVEAL_CLIENTS} clients (leader timings; "
        "close->result is the collector's wall time)",
        ["d", "rounds", "agree", "reveal", "µs/elt", "close->result", "µs/elt", "target"],
        [
            [
                fmt_dim(r["dim"]),
                str(r["reps"]),
                fmt_seconds(r["agree_s"]),
                fmt_seconds(r["reveal_s"]),
                "n/a" if r["us_per_element"] is None else f"{r['us_per_element']:.3f}",
                fmt_seconds(r["close_to_result_s"]),
                f"{r['wall_us_per_element']:.3f}",
                f"<= {fmt_seconds(r['dim'] / 1e6)}",
            ]
            for r in rows
        ],
    )


# -- the plaintext HTTP baseline ------------------------------------------------------------


async def serve_plain(max_dim: int) -> None:
    """The plaintext HTTP aggregation server (run in its own process by the bench).

    ``PUT /rounds/{r}?dim=d`` opens a float64 running sum; ``POST /rounds/{r}/{client}``
    with ``d`` raw float64 values adds them; ``GET /rounds/{r}/total`` returns the sum
    (raw float64) and forgets the round. Prints ``PORT <n>`` once listening on 127.0.0.1.
    """
    from aiohttp import web

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    async def open_round(request: web.Request) -> web.Response:
        rid = request.match_info["round"]
        sums[rid] = np.zeros(int(request.query["dim"]))
        counts[rid] = 0
        return web.Response(status=201)

    async def add(request: web.Request) -> web.Response:
        total = sums.get(request.match_info["round"])
        if total is None:
            return web.Response(status=404)
        body = await request.read()
        if len(body) != 8 * total.shape[0]:
            return web.Response(status=400, text="wrong length")
        np.add(total, np.frombuffer(body, dtype="<f8"), out=total)
        counts[request.match_info["round"]] += 1
        return web.Response(status=201)

    async def result(request: web.Request) -> web.Response:
        rid = request.match_info["round"]
        total = sums.pop(rid)
        count = counts.pop(rid)
        return web.Response(body=total.tobytes(), headers={"X-Clients": str(count)})

    app = web.Application(client_max_size=8 * max_dim + 1024)
    app.add_routes(
        [
            web.put("/rounds/{round}", open_round),
            web.post("/rounds/{round}/{client}", add),
            web.get("/rounds/{round}/total", result),
        ]
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


class PlainServer:
    """The plaintext HTTP server process (this script with ``--serve-plain``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.started_pids: list[int] = []

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-plain"],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=die_with_parent,
        )
        self.started_pids.append(self.proc.pid)
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout_s)
        if not lines or not lines[0].startswith("PORT "):
            self.stop()
            raise RuntimeError("the plaintext HTTP server did not start")
        self.url = f"http://127.0.0.1:{int(lines[0].split()[1])}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


async def plain_round(
    url: str,
    round_id: str,
    clients: int,
    dim: int,
    *,
    seed: int,
    concurrency: int,
    progress: Progress,
    label: str,
    timeout_s: float,
) -> tuple[float, np.ndarray]:
    """The plaintext HTTP aggregation of the same vectors: wall time (s) and the sum."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        t0 = time.perf_counter()
        async with session.put(f"{url}/rounds/{round_id}", params={"dim": str(dim)}) as resp:
            resp.raise_for_status()
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            async with gate:
                body = client_vector(seed, i, dim).tobytes()
                async with session.post(
                    f"{url}/rounds/{round_id}/{client_name(i)}", data=body
                ) as resp:
                    resp.raise_for_status()
                del body
            done += 1
            progress.count(f"{label}: plaintext HTTP", done, clients)

        await asyncio.gather(*(one(i) for i in range(clients)))
        async with session.get(f"{url}/rounds/{round_id}/total") as resp:
            resp.raise_for_status()
            raw = await resp.read()
            count = int(resp.headers["X-Clients"])
        elapsed = time.perf_counter() - t0
    if count != clients:
        raise RuntimeError(f"plaintext server summed {count} vectors, expected {clients}")
    return elapsed, np.frombuffer(raw, dtype="<f8")


def numpy_sum(clients: int, dim: int, seed: int) -> tuple[float, float, np.ndarray]:
    """The plaintext numpy sum of the same vectors: (seconds adding, seconds generating, sum)."""
    acc = np.zeros(dim)
    adding = generating = 0.0
    for i in range(clients):
        t = time.perf_counter()
        x = client_vector(seed, i, dim)
        t1 = time.perf_counter()
        np.add(acc, x, out=acc)
        t2 = time.perf_counter()
        generating += t1 - t
        adding += t2 - t1
    return adding, generating, acc


# -- section: grid ----------------------------------------------------------------------------


def grid_cells(clients: Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Grid cells in run order: by d, then by number of clients (so each cell's time can be
    estimated from the cells before it)."""
    return [(c, d) for d in sorted(dims) for c in sorted(clients)]


def bench_grid(
    federation: Federation,
    server: PlainServer,
    workdir: Path,
    cells: Sequence[tuple[int, int]],
    args: argparse.Namespace,
    progress: Progress,
    save: Callable[[], None],
    out: list[dict[str, Any]],
) -> None:
    """Run (or skip) every cell, appending one row per cell to ``out``."""
    measured: list[tuple[int, int, float]] = []
    m = len(federation.base["aggregators"])
    frac_bits = None
    for n, (clients, dim) in enumerate(cells, 1):
        tag = f"grid {n}/{len(cells)}: {clients} clients x d = {fmt_dim(dim)}"
        mem = available_memory_bytes()
        disk = shutil.disk_usage(workdir).free
        plan = plan_cell(
            clients,
            dim,
            estimate_s=estimate_round_seconds(measured, clients, dim),
            budget_s=args.cell_budget_s,
            memory_bytes=cell_memory_bytes(dim, m, args.concurrency),
            available_memory_bytes=None if mem is None else int(mem * MEMORY_HEADROOM),
            disk_bytes=cell_disk_bytes(clients, dim),
            free_disk_bytes=int(disk * MEMORY_HEADROOM),
            must_run=(clients, dim) in MUST_RUN,
        )
        row: dict[str, Any] = {
            "clients": clients,
            "dim": dim,
            "must_run": plan.must_run,
            "estimate_s": plan.estimate_s,
            "status": "skipped",
            "reason": plan.reason,
            "rss_target_bytes": rss_target_bytes(dim),
        }
        out.append(row)
        if not plan.run:
            progress.line(f"{tag}: skipped: {plan.reason}")
            save()
            continue
        est = "" if plan.estimate_s is None else f" (estimated {plan.estimate_s:.0f} s)"
        progress.line(f"{tag}: running{est}")
        try:
            federation.ensure()
            topo = federation.topology
            frac_bits = topo.encoding.frac_bits
            monitors = [PeakRss(pid) for pid in federation.pids]
            for mon in monitors:
                mon.reset()
            row["aggregator_rss_before_bytes"] = [mon.current() for mon in monitors]
            res = asyncio.run(
                mpc_round(
                    topo,
                    new_round_id("grid"),
                    clients,
                    dim,
                    seed=args.seed,
                    concurrency=args.concurrency,
                    progress=progress,
                    label=tag,
                    timeout_s=max(600.0, 4 * args.cell_budget_s),
                )
            )
            row["aggregator_peak_rss_bytes"] = [mon.peak() for mon in monitors]
            row["rss_method"] = monitors[0].method
        except Exception as exc:  # noqa: BLE001 - any failure of a round is reported
            row.update(status="failed", reason=one_line(f"{type(exc).__name__}: {exc}"))
            row["error"] = f"{type(exc).__name__}: {exc}"
            progress.line(f"{tag}: FAILED: {row['error']}")
            if not isinstance(exc, LaunchError):  # a LaunchError carries the parties' output
                progress.line(f"the parties' last output:\n{federation.log_tail()}")
            save()
            continue
        result = res.pop("result")
        row.update(res)
        row["timings"] = dict(result.timings)
        row["num_clients"] = result.num_clients
        measured.append((clients, dim, res["round_s"]))
        progress.line(f"{tag}: round {res['round_s']:.2f} s; numpy baseline")
        add_s, gen_s, total = numpy_sum(clients, dim, args.seed)
        error = float(np.max(np.abs(result.total - total)))
        bound = clients * 2.0 ** -(frac_bits or 0) + 1e-9
        del result
        row.update(numpy_s=add_s, generate_s=gen_s, max_abs_error=error, error_bound=bound)
        row["ratio_vs_numpy"] = ratio(res["round_s"], add_s)
        if row["num_clients"] != clients or not error <= bound:
            row.update(
                status="failed",
                reason=f"wrong total: {row['num_clients']} clients counted, max abs error "
                f"{error:.3g} (bound {bound:.3g})",
            )
            progress.line(f"{tag}: FAILED: {row['reason']}")
            save()
            continue
        try:
            if not server.alive():
                server.start()
            mon = PeakRss(server.pid)
            mon.reset()
            http_s, http_total = asyncio.run(
                plain_round(
                    server.url,
                    new_round_id("plain"),
                    clients,
                    dim,
                    seed=args.seed,
                    concurrency=args.concurrency,
                    progress=progress,
                    label=tag,
                    timeout_s=max(600.0, 4 * args.cell_budget_s),
                )
            )
            row["http_s"] = http_s
            row["http_peak_rss_bytes"] = mon.peak()
            row["http_max_abs_error"] = float(np.max(np.abs(http_total - total)))
            row["ratio_vs_http"] = ratio(res["round_s"], http_s)
        except Exception as exc:  # noqa: BLE001 - a baseline failure is reported, not fatal
            row["http_error"] = f"{type(exc).__name__}: {exc}"
            progress.line(f"{tag}: plaintext HTTP baseline failed: {row['http_error']}")
        del total
        row["status"] = "ok"
        progress.line(
            f"{tag}: mpc_agg {fmt_seconds(res['round_s'])}, numpy {fmt_seconds(add_s)}, "
            f"HTTP {fmt_seconds(row.get('http_s'))}"
        )
        save()


def grid_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    notes = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        if r["status"] != "ok":
            body.append([name, r["status"]] + [""] * 12)
            notes.append(f"  {name}: {r['status']}: {r['reason']}")
            continue
        peaks = [p for p in r.get("aggregator_peak_rss_bytes") or [] if p]
        peak = max(peaks) if peaks else None
        before = [p for p in r.get("aggregator_rss_before_bytes") or [] if p]
        fl = r.get("flower_s")
        body.append(
            [
                name,
                fmt_seconds(r["round_s"]),
                fmt_seconds(r["upload_s"]),
                fmt_seconds(r["aggregate_s"]),
                fmt_seconds(r["numpy_s"]),
                fmt_ratio(r["ratio_vs_numpy"]),
                fmt_seconds(r.get("http_s")),
                fmt_ratio(r.get("ratio_vs_http")),
                fmt_bytes(max(before)) if before else "n/a",
                fmt_bytes(peak),
                fmt_bytes(r["rss_target_bytes"]),
                f"{r['max_abs_error']:.1e}",
                fmt_seconds(fl) if fl is not None else r.get("flower_note", ""),
                fmt_ratio(r.get("flower_ratio")) if fl is not None else "",
            ]
        )
    table = format_table(
        "grid: end-to-end round wall time (open -> uploads -> aggregate returns), 3 local "
        "parties; ratio = mpc_agg / baseline, Flower ratio = Flower / mpc_agg; RSS: the "
        "largest aggregator's, before the cell and at its peak",
        [
            "clients x d",
            "mpc_agg",
            "uploads",
            "aggregate",
            "numpy",
            "ratio",
            "plain HTTP",
            "ratio",
            "RSS before",
            "peak RSS",
            "RSS target",
            "max err",
            "Flower",
            "Fl/mpc",
        ],
        body,
    )
    return table + ("\nnot run:\n" + "\n".join(notes) if notes else "")


# -- section: flower ------------------------------------------------------------------------


def flower_cells(clients: Sequence[int], dims: Sequence[int]) -> list[tuple[int, int]]:
    """Flower cells in run order (the issue's 10, 100 clients x 1e4..1e6 within the grid)."""
    cs = [c for c in clients if c in FLOWER_CLIENTS]
    ds = [d for d in dims if d in FLOWER_DIMS]
    return [(c, d) for c in sorted(cs) for d in sorted(ds)]


def run_flower_cell(
    script: Path, clients: int, dim: int, timeout_s: float
) -> tuple[dict[str, Any] | None, str | None]:
    """Run the Flower SecAgg+ script once: (its JSON result, None) or (None, why not)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), "--clients", str(clients), "--dim", str(dim), "--json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout stops all it started
        preexec_fn=die_with_parent,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this bench created for it
        proc.communicate()
        return None, f"timed out after {timeout_s:g} s"
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])[-300:]
        return None, f"exited with code {proc.returncode}: {tail}"
    obj = parse_last_json_line(stdout)
    if obj is None or not isinstance(obj.get("seconds"), (int, float)):
        return None, "printed no JSON object with 'seconds' on its last line"
    return obj, None


def bench_flower(
    cells: Sequence[tuple[int, int]],
    script: Path,
    timeout_s: float,
    grid_rows: Sequence[dict[str, Any]],
    progress: Progress,
    save: Callable[[], None],
    out: list[dict[str, Any]],
) -> None:
    """Flower SecAgg+ per cell; its time next to the matching grid cell (ratio Flower/mpc_agg)."""
    reason = None
    if importlib.util.find_spec("flwr") is None:
        reason = "flwr is not installed (pip install -e '.[bench]')"
    elif not script.is_file():
        reason = f"{script} not found"
    by_cell = {(r["clients"], r["dim"]): r for r in grid_rows}
    for n, (clients, dim) in enumerate(cells, 1):
        tag = f"flower {n}/{len(cells)}: {clients} clients x d = {fmt_dim(dim)}"
        row: dict[str, Any] = {"clients": clients, "dim": dim}
        if reason is not None:
            row.update(status="skipped", reason=reason)
        else:
            progress.line(f"{tag}: running (timeout {timeout_s:.0f} s)")
            t = time.perf_counter()
            obj, why = run_flower_cell(script, clients, dim, timeout_s)
            row["wall_s"] = time.perf_counter() - t
            if obj is None:
                row.update(status="skipped", reason=why)
            else:
                row.update(status="ok", **{k: obj.get(k) for k in FLOWER_KEYS})
                row["flower"] = obj  # everything the script reported (stages, memory, ...)
        cell = by_cell.get((clients, dim))
        mpc_s = cell.get("round_s") if cell and cell.get("status") == "ok" else None
        row["mpc_agg_s"] = mpc_s
        row["ratio"] = ratio(row.get("seconds"), mpc_s) if row["status"] == "ok" else None
        if cell is not None:
            if row["status"] == "ok":
                cell["flower_s"] = row["seconds"]
                cell["flower_ratio"] = row["ratio"]
            else:
                cell["flower_note"] = "skipped"
        progress.line(
            f"{tag}: "
            + (
                f"{fmt_seconds(row['seconds'])} (Flower/mpc_agg {fmt_ratio(row['ratio'])})"
                if row["status"] == "ok"
                else f"skipped: {row['reason']}"
            )
        )
        out.append(row)
        save()


def flower_table(rows: Sequence[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        if r["status"] != "ok":
            body.append([name, "skipped: " + str(r["reason"])[:60], "", "", "", ""])
            continue
        body.append(
            [
                name,
                fmt_seconds(r["seconds"]),
                f"{r['max_abs_error']:.1e}" if r.get("max_abs_error") is not None else "n/a",
                f"{r.get('num_shares')}/{r.get('reconstruction_threshold')}",
                fmt_seconds(r["mpc_agg_s"]),
                fmt_ratio(r["ratio"]),
            ]
        )
    version = next((r.get("flwr_version") for r in rows if r.get("flwr_version")), None)
    return format_table(
        f"flower: SecAgg+ (SecAggPlusWorkflow + secaggplus_mod, flwr {version or 'n/a'}); "
        "ratio = Flower / mpc_agg",
        ["clients x d", "Flower", "max err", "shares/thr", "mpc_agg", "ratio"],
        body,
    )


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    return format_table(
        "targets (issue 5): figures for the note, not asserts",
        ["target", "measured", "verdict"],
        [[t["target"], t["value"], t["verdict"]] for t in targets],
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip() if __doc__ else None,
        epilog=(__doc__ or "").split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: d in {1e4, 1e5}, 10 clients, short timings (under a minute)",
    )
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    parser.add_argument(
        "--dims",
        help="comma-separated vector lengths for every section (default 1e4,1e5,1e6,1e7; "
        "with --quick 1e4,1e5)",
    )
    parser.add_argument(
        "--clients",
        help="comma-separated client counts of the grid and Flower (default 10,100,1000; "
        "with --quick 10)",
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="base topology (default configs/local-3.yaml): its parties, threshold, encoding "
        "and fsync, on fresh loopback ports and a temporary data directory",
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="uploads in flight in the grid (default 4)"
    )
    parser.add_argument(
        "--cell-budget-s",
        type=float,
        default=300.0,
        help="skip a grid cell whose estimated round time exceeds this (default 300 s); "
        "the must-complete cells 10 x 1e7 and 1000 x 1e5 run anyway",
    )
    parser.add_argument(
        "--flower-timeout-s",
        type=float,
        default=300.0,
        help="time limit of one Flower SecAgg+ cell (default 300 s)",
    )
    parser.add_argument(
        "--flower-script",
        default=str(FLOWER_SCRIPT),
        help="the Flower SecAgg+ runner (default scripts/flower_secaggplus.py)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated vectors")
    parser.add_argument(
        "--workdir",
        help="directory for journals and logs (default: a new temporary directory, deleted "
        "at the end)",
    )
    parser.add_argument("--serve-plain", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_base_config(path: str) -> dict[str, Any]:
    """The base topology document; refused (ValueError) if it needs TLS, tokens or DP, which
    the benchmark does not set up."""
    Topology.load(path)  # validate it as users would
    doc = yaml.safe_load(Path(path).read_text())
    unsupported = [k for k in ("tls", "auth", "dp") if doc.get(k)]
    if unsupported:
        raise ValueError(
            f"{path}: the benchmark supports topologies without {', '.join(unsupported)}"
        )
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_plain:
        asyncio.run(serve_plain(max(FULL_DIMS)))
        return 0
    try:
        sections = parse_sections(args.only)
        dims = (
            [parse_count(x) for x in args.dims.split(",")]
            if args.dims
            else list(QUICK_DIMS if args.quick else FULL_DIMS)
        )
        clients = (
            [parse_count(x) for x in args.clients.split(",")]
            if args.clients
            else list(QUICK_CLIENTS if args.quick else FULL_CLIENTS)
        )
        base = load_base_config(args.config)
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
        if max(dims) > max(FULL_DIMS):
            raise ValueError(f"--dims above {fmt_dim(max(FULL_DIMS))} are not supported")
    except (ValueError, MpcAggError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dims = sorted(set(dims))
    min_total_s = 0.2 if args.quick else 1.0
    progress = Progress()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {
            "sections": list(sections),
            "quick": args.quick,
            "dims": dims,
            "clients": sorted(set(clients)),
            "config": args.config,
            "fsync": bool(base.get("fsync", True)),
            "concurrency": args.concurrency,
            "cell_budget_s": args.cell_budget_s,
            "flower_timeout_s": args.flower_timeout_s,
            "seed": args.seed,
        },
        **{k: [] for k in ("client", "ingest", "seed_expansion", "reveal", "grid", "flower")},
        "failures": [],
    }

    def save() -> None:
        if args.json:
            results["targets"] = evaluate_targets(results)
            Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")

    def show(text: str) -> None:
        print("\n" + text, flush=True)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mpc_agg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    federation = Federation(base, workdir, progress)
    server = PlainServer()
    topo3 = Topology.from_dict(topology_document(base, workdir / "unused"))
    progress.line(
        f"mpc_agg bench: sections {', '.join(sections)}; d {', '.join(map(fmt_dim, dims))}; "
        f"workdir {workdir}"
    )
    code = 0
    try:
        if "client" in sections:
            results["client"] = bench_client(topo3, dims, min_total_s, progress)
            show(client_table(results["client"]))
            save()
        if "ingest" in sections:
            results["ingest"], results["seed_expansion"] = bench_ingest(
                base, workdir, dims, min_total_s, progress
            )
            show(ingest_table(results["ingest"], results["seed_expansion"]))
            save()
        if "reveal" in sections:
            try:
                results["reveal"] = bench_reveal(
                    federation, dims, progress, timeout_s=max(600.0, args.cell_budget_s)
                )
                show(reveal_table(results["reveal"]))
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                results["failures"].append(one_line(f"reveal: {type(exc).__name__}: {exc}"))
                progress.line(f"reveal: FAILED: {type(exc).__name__}: {exc}")
                if not isinstance(exc, LaunchError):
                    progress.line(f"the parties' last output:\n{federation.log_tail()}")
            save()
        if "grid" in sections:
            if federation.fed is not None:
                # Fresh processes: memory an aggregator kept from the reveal section's largest
                # round would otherwise count in the first cells' peak RSS.
                progress.line("grid: restarting the federation for fresh processes")
                federation.stop()
                federation.fed = None
            bench_grid(
                federation,
                server,
                workdir,
                grid_cells(clients, dims),
                args,
                progress,
                save,
                results["grid"],
            )
            show(grid_table(results["grid"]))
        federation.stop()
        server.stop()
        if "flower" in sections:
            bench_flower(
                flower_cells(clients, dims),
                Path(args.flower_script),
                args.flower_timeout_s,
                results["grid"],
                progress,
                save,
                results["flower"],
            )
            show(flower_table(results["flower"]))
            if results["grid"]:
                show(grid_table(results["grid"]))
        results["failures"] += [
            f"grid {r['clients']} x {fmt_dim(r['dim'])}: {r['reason']}"
            for r in results["grid"]
            if r["status"] == "failed"
        ]
        results["targets"] = evaluate_targets(results)
        show(targets_table(results["targets"]))
        if results["failures"]:
            show("failures:\n" + "\n".join(f"  {f}" for f in results["failures"]))
            code = 1
    except KeyboardInterrupt:
        progress.line("interrupted")
        code = 130
    finally:
        federation.stop()
        server.stop()
        results["machine"]["loadavg_at_end"] = (
            list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        )
        results["machine"]["bench_peak_rss_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        results["machine"]["elapsed_s"] = time.perf_counter() - progress.started
        results["processes"] = {
            "aggregators": federation.started_pids,
            "plain_http_server": server.started_pids,
        }
        save()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    progress.line(f"done in {time.perf_counter() - progress.started:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
