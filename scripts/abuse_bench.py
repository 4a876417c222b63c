#!/usr/bin/env python
"""Load and abuse benchmark: honest clients next to each attack, against real parties.

    python scripts/abuse_bench.py [--honest 6] [--crowd 2000] [--only slow_bodies,idle]
                                  [--fd-limit 1024] [--json out.json]

Starts a local 3-aggregator federation (``mpc_agg.launcher.LocalFederation``, throw-away
keys, TLS and tokens as shipped) on free loopback ports, with aggregator 1 (the attacked
one) under a descriptor limit of ``--fd-limit``. Each scenario opens a round, starts its
attack, has ``--honest`` clients submit while the attack runs, then closes the round, and
reports:

* honest acceptance: honest clients whose upload every aggregator accepted;
* round success: the round revealed exactly the honest clients' total;
* honest upload latency p50 and p99 (seconds, each client's whole ``submit``).

Scenarios (README, "Security model"; issue "Abuse resistance"):

==============  ====================================================================
``baseline``    no attack
``slow_bodies`` one token holder keeps 256 uploads going that send headers and 4 body
                bytes, then nothing
``idle``        1,100 idle TCP connections to the attacked aggregator, reopened when
                closed
``slow_headers``200 TLS connections that send a request line, then a byte every second
``junk_rounds`` the collector's token opens rounds until refused (counts them)
``crowd``       ``--crowd`` honest clients (d = 8) submitting at the same moment
==============  ====================================================================

The attackers are those of ``tests/test_abuse.py`` (``scripts/abuse_attacks.py``). Progress
goes to stderr, the table to stdout. Nothing is asserted: this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mpc_agg.core.codec import share_body_length
from mpc_agg.core.sharing import ShareKind, full_share_index
from mpc_agg.errors import MpcAggError
from mpc_agg.launcher import LocalFederation, free_loopback_ports

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import abuse_attacks as attacks  # noqa: E402

ATTACKED = 1
SCENARIOS = ("baseline", "slow_bodies", "idle", "slow_headers", "junk_rounds", "crowd")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def raise_own_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def topology_doc(name: str) -> dict[str, Any]:
    ports = free_loopback_ports(6)
    return {
        "name": name,
        "threshold": 1,
        "aggregators": [
            {"host": "127.0.0.1", "mpc_port": ports[2 * i], "http_port": ports[2 * i + 1]}
            for i in range(3)
        ],
        "rounds": {"min_clients": 2, "max_clients": 10_000, "max_dim": 1_000_000},
        "encoding": {"frac_bits": 16, "coord_clip": 1000.0},
        "data_dir": "data",
        "fsync": True,
    }


# ------------------------------------------------------------------------------ attacks


async def slow_bodies(fed: LocalFederation, round_id: str, stop: asyncio.Event) -> str:
    """One token holder whose full share goes to the attacked aggregator: 256 uploads of a
    full share's announced length, 4 bytes sent, each started again 2 s after it is
    answered or cut."""
    seen: collections.Counter[str] = collections.Counter()
    m = fed.topology.m
    mallory = next(
        c for c in (f"mallory{k}" for k in range(100)) if full_share_index(c, m) == ATTACKED
    )
    statuses = await fed.collector().status_async(round_id)
    length = share_body_length(ShareKind.FULL, int(statuses[ATTACKED]["dim"]))
    await attacks.slow_uploads(fed, ATTACKED, mallory, round_id, length, 256, stop, seen)
    return f"slow uploads {dict(seen)}"


async def idle(fed: LocalFederation, round_id: str, stop: asyncio.Event) -> str:
    """1,100 TCP connections that send nothing, reopened when closed."""
    seen: collections.Counter[str] = collections.Counter()
    address = fed.topology.aggregators[ATTACKED]
    await attacks.idle_connections(address.host, address.http_port, 1100, stop, seen)
    return f"idle connections {dict(seen)}"


async def slow_headers(fed: LocalFederation, round_id: str, stop: asyncio.Event) -> str:
    """200 TLS connections dribbling a request's headers, one byte a second."""
    seen: collections.Counter[str] = collections.Counter()
    await attacks.slow_headers(fed, ATTACKED, 200, stop, seen)
    return f"slow headers {dict(seen)}"


async def junk_rounds(fed: LocalFederation, round_id: str, stop: asyncio.Event) -> str:
    """The collector's token opens rounds until the aggregators refuse one."""
    collector = fed.collector()
    opened = 0
    refusal = "none"
    while not stop.is_set() and opened < 5000:
        try:
            await collector.open_round_async(f"junk-{round_id}-{opened}", 1000)
            opened += 1
        except MpcAggError as exc:
            refusal = getattr(exc, "code", type(exc).__name__)
            break
    await stop.wait()
    return f"{opened} junk rounds opened, then {refusal}"


async def no_attack(fed: LocalFederation, round_id: str, stop: asyncio.Event) -> str:
    await stop.wait()
    return "no attack"


ATTACKS: dict[str, Callable[[LocalFederation, str, asyncio.Event], Awaitable[str]]] = {
    "baseline": no_attack,
    "slow_bodies": slow_bodies,
    "idle": idle,
    "slow_headers": slow_headers,
    "junk_rounds": junk_rounds,
    "crowd": no_attack,
}


# ------------------------------------------------------------------------------ scenarios


async def honest_round(
    fed: LocalFederation, name: str, clients: int, dim: int, settle_s: float
) -> dict[str, Any]:
    """Run attack ``name`` while ``clients`` honest clients submit to a new round."""
    round_id = f"{name}-{int(time.time() * 1000)}"
    collector = fed.collector()
    await collector.open_round_async(round_id, dim)
    stop = asyncio.Event()
    attack = asyncio.ensure_future(ATTACKS[name](fed, round_id, stop))
    await asyncio.sleep(settle_s)  # let the attack take hold first
    data = np.random.default_rng(7).integers(-100, 101, size=(clients, dim)).astype(float)
    latencies: list[float] = []
    accepted = 0

    async def one(i: int) -> None:
        nonlocal accepted
        client = fed.client(f"{round_id}-h{i}")
        t = time.perf_counter()
        try:
            await client.submit_async(round_id, data[i])
            accepted += 1
            latencies.append(time.perf_counter() - t)
        except MpcAggError as exc:
            log(f"  honest client {i} refused: {exc}")

    await asyncio.gather(*(one(i) for i in range(clients)))
    stop.set()
    summary = await attack
    revealed = False
    try:
        result = await collector.aggregate_async(round_id, timeout=120)
        revealed = bool(
            result.num_clients == accepted and np.allclose(result.total, data.sum(axis=0))
        )
    except MpcAggError as exc:
        log(f"  round failed: {exc}")
    latencies.sort()
    return {
        "scenario": name,
        "attack": summary,
        "honest": clients,
        "accepted": accepted,
        "round_ok": revealed and accepted == clients,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
    }


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"{'scenario':13} {'accepted':>11} {'round':>6} {'p50 s':>7} {'p99 s':>7}  attack",
    ]
    for r in rows:
        lines.append(
            f"{r['scenario']:13} {r['accepted']:>5}/{r['honest']:<5} "
            f"{'ok' if r['round_ok'] else 'FAIL':>6} {fmt(r['p50_s']):>7} {fmt(r['p99_s']):>7}"
            f"  {r['attack']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Honest clients next to each attack against a real local federation; "
        "reports acceptance, round success and upload latency."
    )
    parser.add_argument("--honest", type=int, default=6, help="honest clients per scenario")
    parser.add_argument("--crowd", type=int, default=2000, help="clients of the crowd scenario")
    parser.add_argument("--dim", type=int, default=1000, help="honest vector length")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument("--fd-limit", type=int, default=1024, help="attacked party's limit")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown or args.honest < 1 or args.crowd < 1:
        print(f"error: unknown scenario(s) {unknown} or a count below 1", file=sys.stderr)
        return 2
    own = raise_own_fd_limit()
    log(f"this process may open {own} descriptors; aggregator {ATTACKED} {args.fd_limit}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="abuse-bench-") as tmp:
        config = Path(tmp) / "abuse.yaml"
        config.write_text(yaml.safe_dump(topology_doc("abuse")))
        with (
            open(Path(tmp) / "parties.log", "w") as sink,
            LocalFederation(
                config,
                cwd=tmp,
                output=sink,
                log_level="warning",
                party_command=attacks.limited_party_command(args.fd_limit, ATTACKED),
            ) as fed,
        ):
            for name in names:
                log(f"scenario {name} ...")
                clients, dim = (args.crowd, 8) if name == "crowd" else (args.honest, args.dim)
                started = time.perf_counter()
                row = asyncio.run(honest_round(fed, name, clients, dim, settle_s=1.0))
                row["seconds"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                log(f"  {row}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["round_ok"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
