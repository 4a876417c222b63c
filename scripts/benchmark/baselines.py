"""Plaintext baselines over the very same vectors: numpy adds, a plaintext HTTP aggregation
(one aiohttp server process adding raw float64 bodies, :mod:`.plain_server`), and a raw TCP
stream of float32 vectors one after another (one asyncio server process, :mod:`.tcp_server`)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def self_signed_tls(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A throw-away P-256 certificate for 127.0.0.1 (as an aggregator's ``http_cert``), its
    key, and a client context that trusts exactly it: the HTTPS baseline's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from mpc_agg.identity import self_signed_certificate

    key = ec.generate_private_key(ec.SECP256R1())
    pem = self_signed_certificate(key, "plain-https-baseline", "127.0.0.1").encode()
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "plain-https.crt", directory / "plain-https.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=pem.decode())
    return cert_path, key_path, context


class ServerProcess:
    """A baseline server in its own process (``python -m <module> <args>``, run from the
    checkout's root), which prints ``PORT <n>`` once listening on 127.0.0.1; stopped by its
    pid."""

    def __init__(self, module: str, args: list[str]) -> None:
        self.module = module
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.started_pids: list[int] = []

    def start(self, timeout_s: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
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
            raise RuntimeError(f"the baseline server {self.module} did not start")
        self.port = int(lines[0].split()[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class PlainServer(ServerProcess):
    """The plaintext HTTP server process (:mod:`.plain_server`). ``tls``: (certificate,
    key, client context) to serve HTTPS instead (:func:`self_signed_tls`)."""

    def __init__(self, tls: tuple[Path, Path, ssl.SSLContext] | None = None) -> None:
        tls_args = [] if tls is None else ["--tls", str(tls[0]), str(tls[1])]
        super().__init__(
            "scripts.benchmark.plain_server", ["--max-dim", str(max(FULL_DIMS)), *tls_args]
        )
        self.tls = tls
        self.url = ""

    @property
    def client_ssl(self) -> ssl.SSLContext | None:
        """The client context for this server (None: plain HTTP)."""
        return None if self.tls is None else self.tls[2]

    def start(self, timeout_s: float = 30.0) -> None:
        super().start(timeout_s)
        scheme = "http" if self.tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"


class TcpServer(ServerProcess):
    """The raw TCP float32 aggregation server process (:mod:`.tcp_server`)."""

    def __init__(self) -> None:
        super().__init__("scripts.benchmark.tcp_server", [])


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
    ssl_context: ssl.SSLContext | None = None,
    separate: bool = False,
) -> tuple[float, np.ndarray]:
    """The plaintext HTTP(S) aggregation of the same vectors: wall time (s) and the sum.

    One session (its connections kept) for every upload, as mpc_agg's benchmark clients
    share one; with ``separate``, each client opens its own session (new TCP, and TLS,
    handshakes), as separate client processes would."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    extra: dict[str, Any] = {} if ssl_context is None else {"ssl": ssl_context}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        async with session.put(
            f"{url}/rounds/{round_id}", params={"dim": str(dim)}, **extra
        ) as resp:
            resp.raise_for_status()
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def post(s: aiohttp.ClientSession, i: int) -> None:
            body = client_vector(seed, i, dim).tobytes()
            async with s.post(f"{url}/rounds/{round_id}/{client_name(i)}", data=body, **extra) as r:
                r.raise_for_status()

        async def one(i: int) -> None:
            nonlocal done
            async with gate:
                if separate:
                    async with aiohttp.ClientSession(timeout=timeout) as own:
                        await post(own, i)
                else:
                    await post(session, i)
            done += 1
            progress.count(f"{label}: plaintext HTTP", done, clients)

        await asyncio.gather(*(one(i) for i in range(clients)))
        async with session.get(f"{url}/rounds/{round_id}/total", **extra) as resp:
            resp.raise_for_status()
            raw = await resp.read()
            count = int(resp.headers["X-Clients"])
        elapsed = time.perf_counter() - t0
    if count != clients:
        raise RuntimeError(f"plaintext server summed {count} vectors, expected {clients}")
    return elapsed, np.frombuffer(raw, dtype="<f8")


async def tcp_sequential_round(
    port: int, vectors: Sequence[np.ndarray], *, timeout_s: float
) -> tuple[float, np.ndarray]:
    """The raw TCP baseline of one-after-another uploads: open a round, then each vector
    (as float32, over its own connection: one client each) once the previous one was
    acknowledged (added), then the total. Wall time (s) and the float64 sum."""
    from .tcp_server import COUNT, HEAD

    dim = vectors[0].shape[0]

    async def request(op: bytes, body: bytes | None = None) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(HEAD.pack(op, dim))
            if body is not None:
                writer.write(body)
            await writer.drain()
            if op == b"T":
                (count,) = COUNT.unpack(await reader.readexactly(COUNT.size))
                if count != len(vectors):
                    raise RuntimeError(
                        f"the TCP baseline added {count} vectors, not {len(vectors)}"
                    )
                return await reader.readexactly(8 * dim)
            answer = await reader.readexactly(1)
            if answer != b"K":
                raise RuntimeError(f"the TCP baseline refused {op!r}: {answer!r}")
            return answer
        finally:
            writer.close()
            await writer.wait_closed()

    async def run() -> bytes:
        await request(b"O")
        for x in vectors:
            await request(b"V", x.astype("<f4").tobytes())
        return await request(b"T")

    t0 = time.perf_counter()
    raw = await asyncio.wait_for(run(), timeout_s)
    elapsed = time.perf_counter() - t0
    return elapsed, np.frombuffer(raw, dtype="<f8")
