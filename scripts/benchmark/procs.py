"""The processes the benchmark starts and the machine it runs on: stopping children, peak
memory of a process (over an interval, or over its whole life: ``VmHWM``), disk used under a
directory (sampled while a round runs), available memory, versions and the checkout's
commit."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import signal
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from .plan import ROOT


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


def parse_proc_status(text: str) -> dict[str, int]:
    """Fields of a ``/proc/<pid>/status`` text given in kB (VmHWM, VmRSS, ...), in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


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


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM`` (peak resident set over the process's life so far, unless
    :meth:`PeakRss.reset` cleared it) and ``VmRSS`` (now) of process ``pid`` in bytes, from
    ``/proc/<pid>/status``; empty if the process is gone or the platform has no /proc."""
    try:
        fields = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return {}
    return {k: v for k, v in fields.items() if k in ("VmHWM", "VmRSS")}


def process_io(pid: int | str = "self") -> dict[str, int]:
    """Counters of ``/proc/<pid>/io`` (``write_bytes``: bytes this process caused to be
    written to storage; ``rchar``/``wchar``: bytes through read/write calls, files and
    sockets alike); empty where unreadable."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def dir_bytes(path: Path) -> int:
    """Bytes of disk allocated to the files under ``path`` (``st_blocks``, so sparse files
    count what they hold); files that vanish while it walks are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


class DiskWatch:
    """Peak bytes on disk under each of ``paths`` (:func:`dir_bytes`), sampled every
    ``interval_s`` on a thread between :meth:`start` and :meth:`stop`: spool files and
    journals live only while their round does."""

    def __init__(self, paths: list[Path], interval_s: float = 0.25) -> None:
        self.paths = paths
        self.interval_s = interval_s
        self.peaks = [0] * len(paths)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        for i, path in enumerate(self.paths):
            self.peaks[i] = max(self.peaks[i], dir_bytes(path))

    def start(self) -> None:
        self.sample()

        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[int]:
        """Stop sampling (after a last sample); the peak bytes under each path."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        self.sample()
        return list(self.peaks)


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
