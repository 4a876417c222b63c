"""Every streamed path at once, among three real aggregator processes (README, "Long vectors
(10^8 parameters and more)"): clients build and send their full shares block by block, the
aggregators receive them block by block into spool files (a small ``--stream-above-mb``,
so a modest d takes the large-vector path), a partial client's streamed share is
subtracted, the parties reveal in place, and the collector writes the verified total into
a memory-mapped ``.npy``. The total must be exact."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from mpc_agg.client import Client
from mpc_agg.core.sharing import full_share_index
from mpc_agg.launcher import LocalFederation

from .test_cli_rounds import local3
from .test_federation import http

pytestmark = pytest.mark.processes

D = 300_000
"""2.4 MB full shares in GF(p): above the 1 MiB thresholds set below."""


def test_streamed_client_ingest_reveal_and_collect_give_the_exact_total(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streamed_here = []
    prepare_streamed = Client.prepare_streamed

    def spy(self: Client, *args: object, **kwargs: object) -> object:
        streamed_here.append(self.client_id)
        return prepare_streamed(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Client, "prepare_streamed", spy)
    out = tmp_path / "total.npy"
    rng = np.random.default_rng(7)
    xs = rng.integers(-(2**20), 2**20, size=(3, D)) / 2.0**12  # exact at frac_bits 24
    with LocalFederation(
        local3(tmp_path), cwd=tmp_path, output=open(os.devnull, "w"), stream_above_mb=1.0
    ) as fed:
        fed.collector().open_round("big", D)
        for k, x in enumerate(xs):
            with fed.client(f"c{k}", stream_above_bytes=1 << 20) as client:
                receipt = client.submit("big", x)
            assert receipt.retries == ()
        # A partial client: its full share reaches one aggregator (streamed there) and
        # nothing else; the parties drop it and subtract that share.
        partial = fed.client("p0")
        bodies = partial.prepare("big", rng.normal(size=D))
        full = full_share_index("p0", 3)
        asyncio.run(partial.upload("big", bodies, aggregators=[full]))
        result = fed.collector(timeout_s=60.0).aggregate("big", timeout=120, out=out)
        # Each full share was received as a stream: the 3 clients' and the partial one's.
        topology, tokens = fed.deployment.topology(), fed.deployment.collector_tokens()
        streamed = 0
        for i, address in enumerate(topology.aggregators):
            status, text = http("GET", address, "/metrics", token=tokens[i])
            assert status == 200
            line = f'mpc_agg_uploads_streamed_total{{aggregator="{i}"}} '
            streamed += int(float(text.decode().split(line)[1].split()[0]))
        assert streamed == 4
    assert streamed_here == ["c0", "c1", "c2"]
    assert result.num_clients == 3 and result.dropped_clients == 1
    assert isinstance(result.total, np.memmap)
    assert np.array_equal(np.load(out), xs.sum(axis=0))
