"""Section ``client``: ``Client.prepare`` per vector (clip + encode + shard + serialise) and
its parts, per ring, against numpy adding the same float64 vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpc_agg import Client, Topology
from mpc_agg.core import codec
from mpc_agg.core.sharing import ShareKind, shard

from ..baselines import numpy_add_seconds
from ..report import GB, Progress, fmt_dim, fmt_ratio, fmt_seconds, format_table, median, ratio
from ..workload import client_vector, repeat_timed


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
    ring = topology.encoding.ring
    shares = shard(encoded, "bench-round", "bench-client", topology.m, ring=ring)
    sharding = repeat_timed(
        lambda: shard(encoded, "bench-round", "bench-client", topology.m, ring=ring),
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
        "ring": ring.name,
        "dim": dim,
        "reps": len(prepare),
        "prepare_s": t,
        "encode_s": median(encode),
        "shard_s": median(sharding),
        "serialise_s": median(serialise),
        "numpy_add_s": base,
        "ratio_vs_numpy": ratio(t, base),
        "vector_gbps": 8 * dim / t / GB,
        "ns_per_coordinate": t / dim * 1e9,
        "full_share_bytes": codec.share_body_length(ShareKind.FULL, dim, ring),
    }


def bench_client(
    topologies: Mapping[str, Topology],
    dims: Sequence[int],
    min_total_s: float,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Per d and ring (``topologies``: one per ring): ``Client.prepare`` time per vector and
    its parts (clip+encode, shard, serialise), against the numpy add of the same float64
    vector."""
    rows = []
    for dim in dims:
        for ring, topology in topologies.items():
            progress.line(f"client: d = {fmt_dim(dim)} [{ring}]")
            rows.append(client_row(topology, dim, min_total_s))
    return rows


def client_table(rows: Sequence[dict[str, Any]]) -> str:
    """The client section's rows as a table."""
    return format_table(
        "client: encode + shard per vector (Client.prepare), vs numpy float64 add",
        [
            "d",
            "ring",
            "prepare",
            "ns/coord",
            "clip+encode",
            "shard",
            "serialise",
            "GB/s",
            "numpy add",
            "ratio",
        ],
        [
            [
                fmt_dim(r["dim"]),
                r.get("ring", "gf_p61"),
                fmt_seconds(r["prepare_s"]),
                f"{r['prepare_s'] / r['dim'] * 1e9:.1f}",
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
