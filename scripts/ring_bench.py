#!/usr/bin/env python
"""A/B of the two share rings, ``encoding.ring: gf_p61`` against ``z2_32`` (README, "Cost
model and performance": compact shares). Both rings run interleaved in one process, and
each figure is a median over the repeats.

    python scripts/ring_bench.py micro   # prepare, ingest, reveal (in process, d = 1e6)
    python scripts/ring_bench.py e2e     # 10 x 1e6 and 100 x 1e6 over 3 local processes

Both use 3 aggregators, frac_bits 16 and coord_clip 1 (which fit either ring); e2e runs
with TLS and tokens, 4 uploads in flight, and checks every total against the numpy sum.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from mpc_agg import Client, Topology
from mpc_agg.aggregator import Aggregator
from mpc_agg.core.rounds import RoundState
from mpc_agg.launcher import LocalFederation, free_loopback_ports
from mpc_agg.mpc.memory import InMemoryNetwork
from mpc_agg.mpc.reveal import combine_sum_shares, sum_share_payload

RINGS = ["gf_p61", "z2_32"]


def doc(ring: str, name: str, data_dir: str, fsync: bool = True) -> dict:
    ports = free_loopback_ports(6)
    return {
        "name": name,
        "threshold": 1,
        "aggregators": [
            {"host": "127.0.0.1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]}
            for i in range(3)
        ],
        "rounds": {"min_clients": 2, "max_clients": 1000, "max_dim": 10_000_000},
        "encoding": {"ring": ring, "frac_bits": 16, "coord_clip": 1.0},
        "data_dir": data_dir,
        "fsync": fsync,
    }


def med(xs):
    return statistics.median(xs)


async def micro(repeats: int = 9, d: int = 1_000_000) -> dict:
    """Prepare, ingest and reveal figures of both rings, in process."""
    tmp = Path(tempfile.mkdtemp(prefix="ring-bench-"))
    topos = {r: Topology.from_dict(doc(r, f"m{r.replace('_', '')}", str(tmp / r))) for r in RINGS}
    x = np.random.default_rng(1).uniform(-1, 1, d)
    out: dict = {
        r: {
            "prepare_s": [],
            "ingest_full_s": [],
            "ingest_seed_s": [],
            "reveal_s": [],
            "round_reveal_s": [],
        }
        for r in RINGS
    }
    aggs = {}
    for r in RINGS:
        links = {(i, j): asyncio.Queue() for i in range(3) for j in range(3)}
        aggs[r] = [Aggregator(topos[r], i, InMemoryNetwork(i, links)) for i in range(3)]

    async def run_round(A, rid):
        tasks = [asyncio.ensure_future(a.serve_commands()) for a in A]
        try:
            A[0].request_close(rid)
            while not all(a.rounds[rid].state in (RoundState.DONE, RoundState.FAILED) for a in A):
                await asyncio.sleep(0.005)
            assert A[0].rounds[rid].state is RoundState.DONE, A[0].rounds[rid].failure
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    for k in range(repeats):
        for r in RINGS if k % 2 == 0 else RINGS[::-1]:
            topo, A = topos[r], aggs[r]
            rid = f"r{k}"
            for a in A:
                a.open_round(rid, d)
            bodies_all = []
            for c in range(3):
                cl = Client(topo, f"c{k}-{c}")
                t = time.perf_counter()
                bodies = cl.prepare(rid, x)
                out[r]["prepare_s"].append(time.perf_counter() - t)
                bodies_all.append((f"c{k}-{c}", bodies))
                out[r].setdefault("full_bytes", len(max(bodies, key=len)))
                out[r].setdefault("seed_bytes", len(min(bodies, key=len)))
            for cid, bodies in bodies_all:
                for a in A:
                    t = time.perf_counter()
                    a.receive_share(rid, cid, bodies[a.index])
                    dt = time.perf_counter() - t
                    kind = "ingest_full_s" if len(bodies[a.index]) > 100 else "ingest_seed_s"
                    out[r][kind].append(dt)
            await run_round(A, rid)
            out[r]["round_reveal_s"].append(A[0].rounds[rid].timings.get("reveal_s"))
            # the reveal's own arithmetic: payloads out, three parts in, summed
            ring = topo.encoding.ring
            share = ring.from_signed(np.arange(d, dtype=np.int64))
            t = time.perf_counter()
            payloads = [sum_share_payload(share, ring) for _ in range(3)]
            combine_sum_shares(payloads, d, ring)
            out[r]["reveal_s"].append(time.perf_counter() - t)
    summary = {}
    for r in RINGS:
        o = out[r]
        summary[r] = {
            "prepare_ns_per_coord": round(med(o["prepare_s"]) / d * 1e9, 2),
            "prepare_spread_ns": [
                round(min(o["prepare_s"]) / d * 1e9, 2),
                round(max(o["prepare_s"]) / d * 1e9, 2),
            ],
            "full_upload_bytes": o["full_bytes"],
            "seed_upload_bytes": o["seed_bytes"],
            "ingest_full_ms": round(med(o["ingest_full_s"]) * 1e3, 2),
            "ingest_full_spread_ms": [
                round(min(o["ingest_full_s"]) * 1e3, 2),
                round(max(o["ingest_full_s"]) * 1e3, 2),
            ],
            "ingest_seed_ms": round(med(o["ingest_seed_s"]) * 1e3, 2),
            "ingest_seed_spread_ms": [
                round(min(o["ingest_seed_s"]) * 1e3, 2),
                round(max(o["ingest_seed_s"]) * 1e3, 2),
            ],
            "reveal_combine_ms": round(med(o["reveal_s"]) * 1e3, 2),
            "in_process_round_reveal_ms": round(med(o["round_reveal_s"]) * 1e3, 2),
        }
    return summary


async def e2e_round(fed, round_id: str, n: int, d: int, concurrency: int = 4) -> dict:
    collector = fed.collector()
    t0 = time.perf_counter()
    await collector.open_round_async(round_id, d)
    gate = asyncio.Semaphore(concurrency)
    sent = 0

    async def one(i: int) -> None:
        nonlocal sent
        async with gate:
            x = np.random.default_rng((7, i)).uniform(-1, 1, d)
            receipt = await fed.client(f"k{i:04d}").submit_async(round_id, x)
            sent += receipt.upload_bytes

    await asyncio.gather(*(one(i) for i in range(n)))
    t1 = time.perf_counter()
    result = await collector.aggregate_async(round_id, timeout=600)
    t2 = time.perf_counter()
    expected = sum(np.random.default_rng((7, i)).uniform(-1, 1, d) for i in range(n))
    err = float(np.max(np.abs(result.total - expected)))
    assert err <= n * 2.0**-16, err
    return {
        "round_s": t2 - t0,
        "upload_s": t1 - t0,
        "aggregate_s": t2 - t1,
        "bytes": sent,
        "reveal_s": result.timings.get("reveal_s"),
    }


def e2e(plan: tuple[tuple[int, int, int], ...] = ((10, 10**6, 5), (100, 10**6, 3))) -> dict:
    """End-to-end rounds of both rings: (clients, d, repeats) per entry of ``plan``."""
    base = Path(tempfile.mkdtemp(prefix="ring-bench-e2e-"))
    feds = {}
    for r in RINGS:
        wd = base / r
        wd.mkdir()
        cfg = wd / "t.yaml"
        cfg.write_text(yaml.safe_dump(doc(r, f"e{r.replace('_', '')}", str(wd / "data"))))
        feds[r] = LocalFederation(cfg, cwd=wd, output=(wd / "log.txt").open("w"))
        feds[r].__enter__()
    res: dict = {}
    try:
        for n, d, reps in plan:
            key = f"{n}x{d}"
            res[key] = {r: [] for r in RINGS}
            for k in range(reps + 1):  # the first is a warm-up
                for r in RINGS if k % 2 == 0 else RINGS[::-1]:
                    out = asyncio.run(e2e_round(feds[r], f"{key}-{k}", n, d))
                    if k:
                        res[key][r].append(out)
                    print(
                        key,
                        r,
                        k,
                        {a: round(b, 3) if isinstance(b, float) else b for a, b in out.items()},
                        flush=True,
                    )
    finally:
        for f in feds.values():
            f.__exit__(None, None, None)
    summary = {}
    for key, by in res.items():
        summary[key] = {
            r: {
                "round_s_median": round(med([o["round_s"] for o in v]), 3),
                "round_s_all": [round(o["round_s"], 3) for o in v],
                "upload_s_median": round(med([o["upload_s"] for o in v]), 3),
                "aggregate_s_median": round(med([o["aggregate_s"] for o in v]), 3),
                "reveal_s_median": round(med([o["reveal_s"] for o in v]), 3),
                "upload_bytes": v[0]["bytes"],
            }
            for r, v in by.items()
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["micro", "e2e"], help="which measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    res = asyncio.run(micro()) if args.what == "micro" else e2e()
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
