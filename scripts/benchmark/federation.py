"""The real local federation of the reveal and grid sections, and one mpc_agg round on it.

The parties are :class:`mpc_agg.launcher.LocalFederation` processes on fresh loopback ports
(README, "Running aggregators"), with the throw-away keys and tokens the launcher provisions
in the run's directory; clients and the collector are the package's own, over HTTPS pinned
to each aggregator's certificate, with their tokens (none on an ``insecure`` topology).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from mpc_agg import Client, Collector, Topology
from mpc_agg.identity import token_key
from mpc_agg.launcher import LocalFederation
from mpc_agg.provision import LocalDeployment
from mpc_agg.transport.auth import client_token
from mpc_agg.transport.http_client import new_session

from .report import Progress
from .workload import client_name, client_vector, topology_document


class Federation:
    """One local federation of the base topology ``base`` (a parsed document: one ring of
    the run), for the sections that run rounds; restarted if a party dies. ``name`` names
    its run directories (``<workdir>/<name>-<n>``), so several may share ``workdir``."""

    def __init__(
        self, base: dict[str, Any], workdir: Path, progress: Progress, name: str = "federation"
    ) -> None:
        self.base = base
        self.workdir = workdir
        self.progress = progress
        self.name = name
        self.fed: LocalFederation | None = None
        self.log: IO[str] | None = None
        self.starts = 0
        self.started_pids: list[int] = []
        """Every party process started, for the record (all are stopped by :meth:`stop`)."""

    @property
    def topology(self) -> Topology:
        """The running federation's topology (after :meth:`ensure`)."""
        assert self.fed is not None
        return self.fed.topology

    @property
    def deployment(self) -> LocalDeployment:
        """The running federation's provisioned topology and tokens (after :meth:`ensure`)."""
        assert self.fed is not None
        return self.fed.deployment

    @property
    def pids(self) -> list[int]:
        """The running parties' process ids (after :meth:`ensure`)."""
        assert self.fed is not None
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
        run_dir = self.workdir / f"{self.name}-{self.starts}"
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
            f"{self.name}: {self.fed.topology.m} parties ready in "
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


async def mpc_round(
    deployment: LocalDeployment,
    round_id: str,
    clients: int,
    dim: int,
    *,
    seed: int,
    concurrency: int,
    progress: Progress,
    label: str,
    timeout_s: float,
    separate: bool = False,
    vector_of: Callable[[int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """One mpc_agg round on ``deployment``'s aggregators: open, upload ``clients`` vectors
    (``concurrency`` in flight), then aggregate (the collector checks every aggregator's
    signed statement). Wall times in seconds; the revealed result under ``"result"``.

    The simulated clients share one HTTP session (``Client(session=...)``: connections and
    TLS handshakes kept, as the plaintext baseline's uploads share one); with ``separate``,
    each client opens its own connections (TCP + TLS handshakes), as separate client
    processes would. The collector keeps its connections for the round (``async with``).

    The topology and the aggregators' token keys are read once, before the clock starts;
    each client's tokens are derived from them as it uploads (one HMAC per aggregator).
    Client ``i``'s vector is :func:`~.workload.client_vector` of ``(seed, i)``, generated
    as it uploads (inside the clock), or ``vector_of(i)`` when given (e.g. vectors made
    before the clock starts)."""
    topology = deployment.topology()
    secure = not topology.insecure
    collector = Collector(
        topology, deployment.collector_tokens() if secure else None, timeout_s=timeout_s
    )
    keys = [token_key(d) for d in deployment.party_dirs] if secure else []

    shared = None if separate else new_session(timeout_s)

    def client(i: int) -> Client:
        cid = client_name(i)
        tokens = [client_token(k, cid) for k in keys] if secure else None
        return Client(topology, cid, tokens, timeout_s=timeout_s, session=shared)

    async with contextlib.AsyncExitStack() as stack:
        if shared is not None:
            await stack.enter_async_context(shared)
        await stack.enter_async_context(collector)
        t0 = time.perf_counter()
        await collector.open_round_async(round_id, dim)
        t_open = time.perf_counter()
        gate = asyncio.Semaphore(concurrency)
        done = 0
        sent = 0

        async def one(i: int) -> None:
            nonlocal done, sent
            async with gate:
                x = client_vector(seed, i, dim) if vector_of is None else vector_of(i)
                receipt = await client(i).submit_async(round_id, x)
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
