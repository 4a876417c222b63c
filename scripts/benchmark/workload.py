"""What the benchmark feeds mpc_agg and its baselines: topologies on fresh ports, the
simulated clients' vectors (generated per client from a seed, never all held at once),
the large section's exact inputs (generated block by block), round ids, and repeated
timings."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mpc_agg.launcher import free_loopback_ports

from .plan import FULL_CLIENTS, FULL_DIMS


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


def client_vector(seed: int, index: int, dim: int) -> np.ndarray:
    """Client ``index``'s float64 vector of length ``dim``, uniform in [-1, 1): generated
    on the fly from ``(seed, index)``, identically for mpc_agg and both baselines."""
    return np.random.default_rng((seed, index)).uniform(-1.0, 1.0, dim)


INPUT_BLOCK = 1 << 20
"""Coordinates per block of :func:`input_block`."""


def input_block(seed: int, index: int, block: int, dim: int, frac_bits: int) -> np.ndarray:
    """Block ``block`` (coordinates ``block * INPUT_BLOCK`` onwards, at most
    :data:`INPUT_BLOCK` of them) of client ``index``'s exact input of length ``dim``:
    float64 multiples of ``2**-frac_bits`` in [-1, 1), from ``(seed, index, block)`` alone.
    Such values encode without rounding, so a revealed total of them equals their float64
    sum exactly (any handful of them sums exactly in float64)."""
    start = block * INPUT_BLOCK
    if not 0 <= start < dim:
        raise ValueError(f"block {block} is outside a vector of {dim} coordinates")
    scale = 1 << frac_bits
    units = np.random.default_rng((seed, index, block)).integers(
        -scale, scale, min(INPUT_BLOCK, dim - start)
    )
    return units * (1.0 / scale)


def input_block_count(dim: int) -> int:
    """Blocks of :func:`input_block` in a vector of ``dim`` coordinates."""
    return -(-dim // INPUT_BLOCK)


def client_input(seed: int, index: int, dim: int, frac_bits: int) -> np.ndarray:
    """Client ``index``'s whole exact input (:func:`input_block` after block)."""
    out = np.empty(dim)
    for block in range(input_block_count(dim)):
        start = block * INPUT_BLOCK
        values = input_block(seed, index, block, dim, frac_bits)
        out[start : start + values.shape[0]] = values
    return out


def client_name(index: int) -> str:
    """The id of simulated client ``index``."""
    return f"client-{index:05d}"


def room_for_clients(base: dict[str, Any]) -> int:
    """``rounds.max_clients`` of the benchmark's topologies made from ``base``: its own, or
    room for the grid's largest cell."""
    return max(int((base.get("rounds") or {}).get("max_clients", 0)), max(FULL_CLIENTS) + 10)


def topology_document(
    base: dict[str, Any], data_dir: Path, *, fsync: bool | None = None
) -> dict[str, Any]:
    """``base`` (a parsed topology YAML) on fresh loopback ports, with ``data_dir``, room for
    1000 clients x 1e7 and, if given, ``fsync``."""
    doc: dict[str, Any] = json.loads(json.dumps(base))  # deep copy of plain YAML data
    m = len(doc["aggregators"])
    ports = free_loopback_ports(2 * m)
    doc["name"] = "bench"
    doc["aggregators"] = [
        {"host": "127.0.0.1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]}
        for i in range(m)
    ]
    rounds = dict(doc.get("rounds") or {})
    rounds["max_dim"] = max(int(rounds.get("max_dim", 0)), max(FULL_DIMS))
    rounds["max_clients"] = room_for_clients(base)
    doc["rounds"] = rounds
    doc["data_dir"] = str(data_dir)
    if fsync is not None:
        doc["fsync"] = fsync
    return doc


_round_counter = iter(range(10**9))


def new_round_id(kind: str) -> str:
    """A round id unique within this bench run."""
    return f"bench-{kind}-{os.getpid()}-{next(_round_counter)}"
