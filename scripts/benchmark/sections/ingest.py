"""Section ``ingest``: aggregator 0's upload path in process (``receive_share_async``; no
HTTP, no MPC, an in-memory party network that is never used) for full and seed shares, fsync
on and off, 1 or 4 uploads in flight, against numpy adding the same vector; and seed
expansion (``core.xof.expand``) alone."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpc_agg import Topology
from mpc_agg.core import codec, xof
from mpc_agg.core.ring import ring_named
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.mpc.memory import memory_networks

from ..baselines import numpy_add_seconds
from ..plan import INGEST_CASES
from ..report import (
    GB,
    Progress,
    fmt_dim,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    format_table,
    median,
    ratio,
)
from ..rings import base_ring
from ..workload import client_name, repeat_timed, topology_document

MAX_UPLOADS = 300
"""Most uploads one :func:`ingest_times` run makes."""


def ingest_clients(m: int, full: bool, count: int = MAX_UPLOADS) -> list[str]:
    """``count`` distinct client ids whose share at aggregator 0 is a full share (``full``)
    or a seed share: an aggregator accepts from each client only the kind
    :func:`~mpc_agg.core.sharing.full_share_index` designates for it."""
    ids: list[str] = []
    k = 0
    while len(ids) < count:
        cid = client_name(k)
        k += 1
        if (full_share_index(cid, m) == 0) == full:
            ids.append(cid)
    return ids


async def ingest_times(
    topology: Topology,
    dim: int,
    full_bodies: Sequence[bytes | bytearray] | None,
    min_total_s: float,
    inflight: int,
) -> tuple[list[float], float]:
    """Uploads accepted by a fresh aggregator 0, ``inflight`` at a time, one distinct client
    each (the ``full_bodies`` in turn, or with None a new seed share per client; the clients
    are ones whose share at aggregator 0 is of that kind), until ``min_total_s`` has passed
    (at most :data:`MAX_UPLOADS`): (seconds per upload, wall seconds of them all)."""
    from mpc_agg.aggregator import Aggregator

    agg = Aggregator(topology, 0, memory_networks(topology.m)[0])  # no MPC call is made
    agg.open_round("ingest", dim)
    clients = ingest_clients(topology.m, full=full_bodies is not None)
    latencies: list[float] = []
    started = time.perf_counter()
    issued = 0

    def more() -> bool:
        elapsed = time.perf_counter() - started
        return issued < MAX_UPLOADS and (issued < 3 * inflight or elapsed < min_total_s)

    async def worker() -> None:
        nonlocal issued
        while more():
            i = issued
            issued += 1
            if full_bodies is not None:
                body = full_bodies[i % len(full_bodies)]
            else:
                seed = os.urandom(xof.SEED_BYTES)
                body = codec.encode_share(
                    Share(0, ShareKind.SEED, dim, seed=seed, ring=topology.encoding.ring)
                )
            t = time.perf_counter()
            accepted = await agg.receive_share_async("ingest", clients[i], body)
            latencies.append(time.perf_counter() - t)
            if not accepted:
                raise RuntimeError("ingest: the upload of a new client was taken for a retry")

    try:
        await asyncio.gather(*(worker() for _ in range(inflight)))
        wall = time.perf_counter() - started
    finally:
        agg.close_journals()
    return latencies, wall


def ingest_rows(
    base: dict[str, Any], workdir: Path, dim: int, min_total_s: float, progress: Progress
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One d of the ingest section in the ring of ``base``: rows per (fsync, in flight,
    kind), and the seed expansion alone."""
    ring = ring_named(base_ring(base))
    base_add = numpy_add_seconds(dim, min_total_s / 3)
    rng = np.random.default_rng(dim)
    full_bodies = [
        codec.encode_share(
            Share(
                0,
                ShareKind.FULL,
                dim,
                vector=ring.from_signed(rng.integers(-(2**30), 2**30, dim)),
                ring=ring,
            )
        )
        for _ in range(2)
    ]
    rows = []
    for fsync, inflight in INGEST_CASES:
        for kind in ("full", "seed"):
            progress.line(
                f"ingest: d = {fmt_dim(dim)} [{ring.name}], {kind} shares, fsync "
                f"{'on' if fsync else 'off'}, {inflight} in flight"
            )
            data = workdir / f"ingest-{ring.name}-{dim}-{kind}-{int(fsync)}-{inflight}"
            topo = Topology.from_dict(topology_document(base, data, fsync=fsync))
            bodies = full_bodies if kind == "full" else None
            try:
                times, wall = asyncio.run(ingest_times(topo, dim, bodies, min_total_s, inflight))
            finally:
                shutil.rmtree(data, ignore_errors=True)
            per_client = wall / len(times)  # amortised: what throughput costs per client
            body_len = codec.share_body_length(
                ShareKind.FULL if kind == "full" else ShareKind.SEED, dim, ring
            )
            rows.append(
                {
                    "ring": ring.name,
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
    t = median(repeat_timed(lambda: ring.expand(seed, context, dim), min_total_s=min_total_s / 3))
    out_bytes = ring.itemsize * dim
    return rows, {"ring": ring.name, "dim": dim, "seconds": t, "gbps": out_bytes / t / GB}


def bench_ingest(
    bases: Mapping[str, dict[str, Any]],
    workdir: Path,
    dims: Sequence[int],
    min_total_s: float,
    progress: Progress,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per d and ring (``bases``: one topology document per ring): aggregator 0's upload
    path (``receive_share_async``) for full and seed bodies of distinct clients, fsync on
    and off, one or several in flight (clients/s, body GB/s, vs numpy add); and the ring's
    seed expansion alone (GB/s)."""
    rows: list[dict[str, Any]] = []
    expansion: list[dict[str, Any]] = []
    for dim in dims:
        for base in bases.values():
            more, expand = ingest_rows(base, workdir, dim, min_total_s, progress)
            rows += more
            expansion.append(expand)
    return rows, expansion


def ingest_table(rows: Sequence[dict[str, Any]], expansion: Sequence[dict[str, Any]]) -> str:
    """The ingest rows as a table, then the seed expansion alone."""
    table = format_table(
        "ingest: the aggregator's upload path in process (no HTTP, no MPC); per client = wall "
        "time / uploads (amortised over those in flight); GB/s of body and of the d x 8-byte "
        "vector added; ratio = per client / numpy float64 add",
        [
            "d",
            "ring",
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
                r.get("ring", "gf_p61"),
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
        "seed expansion alone: the ring's expand (one core; output d elements of 8 bytes in "
        "gf_p61, 4 in z2_32)",
        ["d", "ring", "time", "GB/s"],
        [
            [
                fmt_dim(e["dim"]),
                e.get("ring", "gf_p61"),
                fmt_seconds(e["seconds"]),
                f"{e['gbps']:.2f}",
            ]
            for e in expansion
        ],
    )
    return table + "\n\n" + expand
