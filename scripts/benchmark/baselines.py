"""Plaintext baselines over the very same vectors: numpy adds, and a plaintext HTTP
aggregation (one aiohttp server process adding raw float64 bodies, :mod:`.plain_server`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import numpy as np

from mpc_agg.launcher import die_with_parent

from .plan import FULL_DIMS, ROOT
from .procs import stop_process
from .report import Progress, median
from .workload import client_name, client_vector, repeat_timed


def numpy_add_seconds(dim: int, min_total_s: float) -> float:
    """Median time (s) of ``np.add(acc, x, out=acc)`` for float64 vectors of length ``dim``:
    the plaintext baseline of one client's contribution."""
    x = np.random.default_rng(0).uniform(-1.0, 1.0, dim)
    acc = np.zeros(dim)
    np.add(acc, x, out=acc)  # first touch of the pages outside the timing
    return median(repeat_timed(lambda: np.add(acc, x, out=acc), min_total_s=min_total_s))


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


class PlainServer:
    """The plaintext HTTP server process (``python -m scripts.benchmark.plain_server``, run
    from the checkout's root); stopped by its pid."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.started_pids: list[int] = []

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.benchmark.plain_server",
                "--max-dim",
                str(max(FULL_DIMS)),
            ],
            cwd=ROOT,
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
