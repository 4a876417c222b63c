"""Rounds with bounds against real aggregator processes (issue 13): a restart after 1,000
junk rounds comes back ready, with every party under a descriptor limit below the number of
open rounds (open rounds hold no descriptor), and the cap and the abort work over MPyC.

Every process is started by a :class:`~mpc_agg.launcher.LocalFederation` and stopped by it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.errors import RemoteRefusal
from mpc_agg.launcher import LocalFederation
from mpc_agg.transport.http_client import AggregatorAPI, new_session

from .conftest import topology_doc, write_topology

pytestmark = pytest.mark.processes

JUNK = 1000
FD_LIMIT = 512
"""Below the number of open rounds: a party that held a descriptor per round would fail."""

LIMITED_PARTY = [
    sys.executable,
    "-u",
    "-c",
    "import resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
    "from mpc_agg.party import main; sys.exit(main(sys.argv[1:]))",
]


async def _each(fed: LocalFederation, requests: list[tuple[int, str, str, Any]]) -> list[Any]:
    """Send ``(aggregator, method, path, json)`` requests with the collector's tokens over one
    session (kept-alive connections), 16 at a time; returns each answer or refusal."""
    topology = fed.topology
    tokens = fed.deployment.collector_tokens()
    async with new_session(60.0) as session:
        apis = [
            AggregatorAPI(session, a, token=tokens[a.index], fingerprint=fingerprint(topology))
            for a in topology.aggregators
        ]
        gate = asyncio.Semaphore(16)

        async def one(i: int, method: str, path: str, body: Any) -> Any:
            async with gate:
                try:
                    return await apis[i].request(method, path, json_body=body)
                except RemoteRefusal as exc:
                    return exc

        return await asyncio.gather(*(one(*r) for r in requests))


def each(fed: LocalFederation, requests: list[tuple[int, str, str, Any]]) -> list[Any]:
    return asyncio.run(_each(fed, requests))


def open_everywhere(fed: LocalFederation, ids: list[str]) -> list[Any]:
    m = fed.topology.m
    return each(fed, [(i, "PUT", f"/v1/rounds/{r}", {"dim": 4}) for r in ids for i in range(m)])


def test_a_restart_after_1000_junk_rounds_comes_back_ready(tmp_path: Path) -> None:
    doc = topology_doc(3, 1, name="junk")
    doc["rounds"] = {**doc["rounds"], "max_open": JUNK + 100}
    config = write_topology(tmp_path, doc)
    junk = [f"junk-{k:04d}" for k in range(JUNK)]
    with open(os.devnull, "w") as sink:
        fed = LocalFederation(config, cwd=tmp_path, output=sink, party_command=LIMITED_PARTY)
        try:
            fed.start()
            fed.wait_ready()
            started = time.monotonic()
            answers = open_everywhere(fed, junk)
            open_s = time.monotonic() - started
            assert all(isinstance(a, tuple) and a[0] == 201 for a in answers), answers[:3]
            before = fed.collector().rounds()
            assert [x["live"] for x in before] == [JUNK] * 3
        finally:
            fed.stop()

        started = time.monotonic()
        fed = LocalFederation(config, cwd=tmp_path, output=sink, party_command=LIMITED_PARTY)
        try:
            fed.start()
            fed.wait_ready()  # within deadlines.startup_s, or LaunchError
            restart_s = time.monotonic() - started
            collector = fed.collector()
            after = collector.rounds()
            assert [x["live"] for x in after] == [JUNK] * 3  # none expired, none over the cap
            assert after[1]["rounds"][0]["opened"] == before[1]["rounds"][0]["opened"]

            # A new round works.
            data = np.arange(3 * 4, dtype=np.float64).reshape(3, 4)
            collector.open_round("fresh", 4)
            for k, x in enumerate(data):
                fed.client(f"fresh-c{k}").submit("fresh", x)
            result = collector.aggregate("fresh", timeout=60)
            assert np.array_equal(result.total, data.sum(axis=0))

            # An abort goes through the leader's command to every party.
            status = collector.abort(junk[0], timeout=30)
            assert (status["state"], status["failure_code"]) == ("failed", "cancelled")
            deadline = time.monotonic() + 10
            views = collector.status(junk[0])
            while not all(v["state"] == "failed" for v in views) and time.monotonic() < deadline:
                time.sleep(0.05)
                views = collector.status(junk[0])
            assert [(v["state"], v["failure_code"]) for v in views] == [("failed", "cancelled")] * 3

            # The cap bounds the rest: 999 live rounds + 101 = rounds.max_open, then 429.
            answers = open_everywhere(fed, [f"more-{k:03d}" for k in range(101)])
            assert all(isinstance(a, tuple) and a[0] == 201 for a in answers)
            answers = open_everywhere(fed, ["one-too-many"])
            assert [getattr(a, "code", a) for a in answers] == ["too_many_rounds"] * 3
        finally:
            fed.stop()
    print(
        f"\nopened {JUNK} junk rounds at 3 parties in {open_s:.1f} s; restart to ready "
        f"(provisioning, 3 processes, recovery of {JUNK} open rounds each, links): "
        f"{restart_s:.1f} s"
    )
