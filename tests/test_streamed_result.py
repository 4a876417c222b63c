"""Streaming the result (issue 15): block-wise digests and codecs against the whole-vector
ones, noise added in place block by block, the reveal written into the share's own
buffer, and the collector's ``out=`` path over HTTPS in this process (real aggregators,
real HTTP server and collector, in-memory party network): a total streamed into a
memory-mapped ``.npy``, a lying leader refused with no file left behind; the hidden partial
file is created exclusively (a symlink planted at its name is never followed) and one left
by a collector killed with SIGKILL is deleted by the next one writing the same file.

Real processes and ``mpc-agg collect --out`` are in tests/test_streamed_result_processes.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mpc_agg import collector as collector_module
from mpc_agg.aggregator import privacy as privacy_module
from mpc_agg.aggregator.privacy import DiscreteGaussianNoise
from mpc_agg.collector import AggregateResult, load_and_verify, verify_saved
from mpc_agg.core import codec, field
from mpc_agg.core import statement as statement_module
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import GF_P61, Z2_32, Ring
from mpc_agg.core.rounds import RoundState
from mpc_agg.core.sharing import unshard
from mpc_agg.core.statement import (
    TOTAL_LABELS,
    ResultMismatch,
    TotalDigest,
    total_digest,
)
from mpc_agg.dp.discrete_gaussian import NoiseStream, SamplerOverflow, sample_discrete_gaussian
from mpc_agg.dp.planning import NoisePlan
from mpc_agg.errors import (
    AggregatorUnavailable,
    AgreementFailed,
    EncodingError,
    MalformedUpload,
    UsageError,
)
from mpc_agg.mpc import reveal
from mpc_agg.mpc.memory import memory_networks
from mpc_agg.mpc.reveal import reveal_sum
from mpc_agg.provision import provision_local

from .conftest import topology_doc, write_topology
from .test_aggregator import run_round
from .test_fail_closed import assert_failed_everywhere_nothing_revealed, federation, fill
from .test_http_server import https_federation, run

RINGS = [GF_P61, Z2_32]


def ring_vector(ring: Ring, values: list[int]) -> np.ndarray:
    return np.array([v % (field.P if ring is GF_P61 else 2**32) for v in values], ring.dtype)


def whole_digest(ring: Ring, total: np.ndarray) -> str:
    """The digest as it was defined before block-wise hashing: one SHA-256 over the label,
    d and every value (written out from statement.py's docstring)."""
    preimage = TOTAL_LABELS[ring.name] + struct.pack("<Q", total.shape[0])
    return hashlib.sha256(preimage + total.astype(ring.wire).tobytes()).hexdigest()


# --------------------------------------------------------------------------- digests


@settings(max_examples=150, deadline=None)
@given(
    ring=st.sampled_from(RINGS),
    values=st.lists(st.integers(0, 2**64 - 1), max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    block=st.integers(1, 9),
)
def test_block_wise_digest_equals_the_whole_vector_digest(
    ring: Ring, values: list[int], cuts: list[int], block: int
) -> None:
    total = ring_vector(ring, values)
    expected = whole_digest(ring, total)
    # Any split of the vector into blocks, fed to TotalDigest ...
    digest = TotalDigest(ring, total.shape[0])
    edges = sorted({0, total.shape[0], *(c for c in cuts if c <= total.shape[0])})
    for a, b in zip(edges, edges[1:], strict=False):
        digest.update(total[a:b])
    assert digest.hexdigest() == expected
    # ... and total_digest itself with blocks of any size.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(statement_module, "DIGEST_BLOCK", block)
        assert total_digest(total) == expected
        assert total_digest(total.astype(f">u{ring.itemsize}")) == expected  # byte order


def test_total_digest_refuses_incomplete_excess_and_foreign_blocks() -> None:
    digest = TotalDigest(GF_P61, 3)
    digest.update(np.array([1, 2], np.uint64))
    with pytest.raises(EncodingError, match="only 2 were hashed"):
        digest.hexdigest()
    with pytest.raises(EncodingError, match="got 4 or more"):
        digest.update(np.array([1, 2], np.uint64))
    with pytest.raises(EncodingError, match="not below p"):
        digest.update(np.array([field.P], np.uint64))
    with pytest.raises(EncodingError, match="1-D uint64"):
        digest.update(np.array([1], np.uint32))
    with pytest.raises(EncodingError, match="must be an integer"):
        TotalDigest(GF_P61, -1)


def test_a_late_non_canonical_value_is_refused_by_the_block_wise_digest(monkeypatch) -> None:
    monkeypatch.setattr(statement_module, "DIGEST_BLOCK", 4)
    total = np.arange(10, dtype=np.uint64)
    total[9] = field.P
    with pytest.raises(EncodingError, match="not below p"):
        total_digest(total)


# --------------------------------------------------------------------------- the codec


@settings(max_examples=100, deadline=None)
@given(
    ring=st.sampled_from(RINGS),
    values=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=40),
    meta=st.dictionaries(st.text(max_size=5), st.integers(-5, 5), max_size=3),
    piece=st.integers(1, 7),
)
def test_streamed_result_bytes_and_reading_equal_the_whole_body(
    ring: Ring, values: list[int], meta: dict[str, int], piece: int
) -> None:
    total = ring_vector(ring, values)
    whole = codec.encode_result(total, meta)
    parts = codec.result_parts(total, meta)
    chunks = list(parts.chunks(piece))
    assert b"".join(chunks) == whole and parts.length == len(whole)
    assert all(isinstance(c, memoryview) for c in chunks[1:])  # views, no copies
    # A reader that sees the header first, then the metadata, then the pieces.
    dim, meta_len = codec.decode_result_header(whole[: codec.RESULT_HEADER.size], ring)
    assert codec.result_body_length(ring, dim, meta_len) == len(whole)
    start = codec.RESULT_HEADER.size + meta_len
    assert codec.decode_result_meta(whole[codec.RESULT_HEADER.size : start]) == meta
    size = piece * ring.itemsize
    blocks = [
        codec.decode_result_block(whole[a : a + size], ring) for a in range(start, len(whole), size)
    ]
    decoded, decoded_meta = codec.decode_result(whole, ring)
    assert np.array_equal(np.concatenate(blocks), decoded) and decoded_meta == meta
    assert np.array_equal(decoded, total)


def test_streamed_result_pieces_are_refused_like_the_whole_body() -> None:
    total = np.array([1, 2, 3], np.uint64)
    body = codec.encode_result(total, {"n": 1})
    with pytest.raises(MalformedUpload, match="shorter than its header"):
        codec.decode_result_header(body[:15])
    with pytest.raises(MalformedUpload, match="not an mpc_agg v1 result"):
        codec.decode_result_header(b"X" + body[1:16])
    with pytest.raises(MalformedUpload, match="not below p"):
        codec.decode_result_block(np.array([field.P], "<u8").tobytes())
    with pytest.raises(MalformedUpload, match="a piece of a gf_p61 total of 7 bytes"):
        codec.decode_result_block(bytes(7))
    with pytest.raises(MalformedUpload, match="not a JSON object"):
        codec.decode_result_meta(b"[1]")


# --------------------------------------------------------------------------- noise in place


def gaussian_plan(sigma2: int, d: int) -> NoisePlan:
    return NoisePlan(
        mechanism="discrete_gaussian",  # type: ignore[arg-type]
        epsilon=1.0,
        delta=1e-5,
        d=d,
        m=3,
        honest=2,
        delta1=1.0,
        delta2=1.0,
        sigma2=sigma2,
        scale=1.0,
        tail=10**6,
    )


KEY = bytes(range(32))


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("d", [1, 15, 16, 17, 50])
def test_noise_is_added_in_place_as_consecutive_draws_of_one_stream(
    monkeypatch, ring: Ring, d: int
) -> None:
    monkeypatch.setattr(privacy_module, "NOISE_BLOCK", 16)
    rng = np.random.default_rng(d)
    before = rng.integers(0, min(ring.modulus, field.P), size=d, dtype=np.uint64).astype(ring.dtype)
    share = before.copy()
    noisy = DiscreteGaussianNoise(gaussian_plan(1000, d), ring).add_local(share, NoiseStream(KEY))
    assert noisy is share  # the same buffer, noised in place
    # The reference: the same key's stream drawn block after block, added at once.
    stream = NoiseStream(KEY)
    noise = np.concatenate(
        [sample_discrete_gaussian(1000, min(16, d - a), stream) for a in range(0, d, 16)]
    )
    assert np.array_equal(share, ring.add(before, ring.from_signed(noise)))


def test_block_wise_noise_has_the_discrete_gaussian_distribution(monkeypatch) -> None:
    """Chi-square goodness of fit of 200,000 block-wise draws (blocks of 1,000, from a
    fresh OS-keyed stream as in production) against the exact pmf of N_Z(0, 4). The
    threshold is the 1 - 1e-6 quantile: a correct sampler fails about once in a million
    runs."""
    monkeypatch.setattr(privacy_module, "NOISE_BLOCK", 1000)
    n, sigma2 = 200_000, 4
    share = GF_P61.zeros(n)
    DiscreteGaussianNoise(gaussian_plan(sigma2, n), GF_P61).add_local(share, NoiseStream())
    x = GF_P61.to_signed(share)
    support = np.arange(-7, 8)
    weights = np.exp(-(np.arange(-60, 61) ** 2) / (2 * sigma2))
    pmf = weights / weights.sum()
    inside = pmf[53:68]  # P(x) for x in -7..7
    expected = np.append(inside, 1 - inside.sum()) * n  # the tail |x| >= 8 as one cell
    observed = np.append([np.count_nonzero(x == k) for k in support], np.count_nonzero(abs(x) > 7))
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=len(expected) - 1), (chi2, observed)
    assert abs(x.mean()) < 6 * math.sqrt(sigma2 / n)


def test_noise_in_place_allocates_no_d_sized_temporary(monkeypatch) -> None:
    monkeypatch.setattr(privacy_module, "NOISE_BLOCK", 1024)
    d = 1 << 19  # a d-sized int64 temporary would be 4 MiB
    share = GF_P61.zeros(d)
    mechanism = DiscreteGaussianNoise(gaussian_plan(10**6, d), GF_P61)
    stream = NoiseStream()
    tracemalloc.start()
    try:
        mechanism.add_local(share, stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes at peak"
    assert np.count_nonzero(share) > d // 2


def test_a_sampler_failure_in_a_late_block_raises_and_the_round_reveals_nothing(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(privacy_module, "NOISE_BLOCK", 16)  # fill() uses d = 64: 4 blocks
    honest = privacy_module.sample_discrete_gaussian
    blocks = {"faulty": 0}

    class FaultyStream(NoiseStream):
        """The keystream of the faulty aggregator (aggregator 1)."""

    def fails_at_its_third_block(sigma2: int, size: int, stream: NoiseStream) -> np.ndarray:
        if isinstance(stream, FaultyStream):
            blocks["faulty"] += 1
            if blocks["faulty"] == 3:
                raise SamplerOverflow("injected")
        return honest(sigma2, size, stream)

    aggs = federation(tmp_path)
    aggs[1].privacy.noise_stream = FaultyStream
    fill(aggs, "r")
    monkeypatch.setattr(privacy_module, "sample_discrete_gaussian", fails_at_its_third_block)
    asyncio.run(run_round(aggs, "r"))
    assert blocks["faulty"] == 3  # two blocks added in place, then the failure
    assert_failed_everywhere_nothing_revealed(aggs, "r")


def test_a_noise_sample_beyond_the_ring_in_a_late_block_aborts(monkeypatch) -> None:
    monkeypatch.setattr(privacy_module, "NOISE_BLOCK", 2)
    draws = iter([np.array([1, 2]), np.array([2**31, 0])])
    monkeypatch.setattr(privacy_module, "sample_discrete_gaussian", lambda *a: next(draws))
    share = Z2_32.zeros(4)
    with pytest.raises(AgreementFailed, match="magnitude 2147483648 is beyond"):
        DiscreteGaussianNoise(gaussian_plan(4, 4), Z2_32).add_local(share, NoiseStream())
    assert share.tolist() == [1, 2, 0, 0]  # partly noised: never sent (the round fails)


def test_a_share_of_the_wrong_shape_is_not_noised() -> None:
    with pytest.raises(AgreementFailed, match="for a share of"):
        DiscreteGaussianNoise(gaussian_plan(4, 4), GF_P61).add_local(GF_P61.zeros(5), NoiseStream())


# --------------------------------------------------------------------------- reveal in place


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("d", [1, 4, 9, 17])
def test_the_reveal_writes_the_total_into_each_partys_own_share(
    monkeypatch, ring: Ring, d: int
) -> None:
    monkeypatch.setattr(reveal, "REVEAL_SLICE", 4)
    rng = np.random.default_rng(d)
    sums = [
        rng.integers(0, min(ring.modulus, field.P), size=d, dtype=np.uint64).astype(ring.dtype)
        for _ in range(3)
    ]
    expected = unshard([s.copy() for s in sums], ring)
    nets = memory_networks(3)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(
            *(reveal_sum(n, s, d, ring) for n, s in zip(nets, sums, strict=True))
        )

    totals = asyncio.run(main())
    for own, total in zip(sums, totals, strict=True):
        assert total is own and np.array_equal(own, expected)


def test_a_bad_payload_in_a_late_slice_fails_every_party_at_that_slice(monkeypatch) -> None:
    monkeypatch.setattr(reveal, "REVEAL_SLICE", 4)
    rng = np.random.default_rng(3)
    sums = [rng.integers(0, field.P, size=10, dtype=np.uint64) for _ in range(3)]
    sums[2][9] = field.P  # aggregator 2's third slice holds a non-element
    nets = memory_networks(3)

    async def main() -> list[object]:
        return await asyncio.gather(
            *(reveal_sum(n, s, 10) for n, s in zip(nets, sums, strict=True)), return_exceptions=True
        )

    outcomes = asyncio.run(main())
    assert all(isinstance(o, AgreementFailed) and o.code == "bad_share" for o in outcomes)
    assert nets[0].in_flight() == 0  # all stopped after the same (third) exchange


def test_the_reveal_allocates_no_d_sized_temporary(monkeypatch) -> None:
    monkeypatch.setattr(reveal, "REVEAL_SLICE", 1024)
    d = 1 << 18  # 2 MiB per share
    rng = np.random.default_rng(0)
    sums = [rng.integers(0, field.P, size=d, dtype=np.uint64) for _ in range(3)]
    expected = unshard([s.copy() for s in sums])
    nets = memory_networks(3)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(reveal_sum(n, s, d) for n, s in zip(nets, sums, strict=True)))

    tracemalloc.start()
    try:
        asyncio.run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes at peak for three parties"
    assert all(np.array_equal(s, expected) for s in sums)


# --------------------------------------------------------------------------- the collector


class Federation:
    """Three aggregators over HTTPS in this process with their own keys and tokens, their
    party network in memory; ``streamed`` results (bodies above 1 MiB) go the streaming way
    through the real handler."""

    def __init__(self, tmp_path: Path) -> None:
        doc = topology_doc(3, 1, name="stream")
        doc["encoding"] = {"frac_bits": 16, "coord_clip": 1000.0, "l2_clip": None}
        self.deployment = provision_local(write_topology(tmp_path, doc), cwd=tmp_path)
        self.topology = self.deployment.topology()

    def round(self, round_id: str, xs: np.ndarray, body: Any) -> Any:
        """Open ``round_id``, submit the rows of ``xs``, then ``await body(aggs, collector)``
        with the federation up."""

        async def main() -> Any:
            stack: list[Any] = []
            aggs: list[Any] = []
            loops: list[asyncio.Task[None]] = []
            try:
                aggs, loops = await https_federation(self.deployment, stack)
                collector = self.deployment.collector(timeout_s=20.0)
                await collector.open_round_async(round_id, xs.shape[1])
                for k, x in enumerate(xs):
                    await self.deployment.client(f"c{k}").submit_async(round_id, x)
                return await body(aggs, collector)
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
                for runner in reversed(stack):
                    await runner.cleanup()
                for a in aggs:
                    a.close_journals()

        return run(main(), timeout_s=90.0)


def client_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """Vectors whose sum is exact in the encoding (multiples of 2^-8, |x| < 256)."""
    return np.random.default_rng(seed).integers(-(2**16), 2**16, size=(n, d)) / 2.0**8


D_STREAMED = 200_000  # 1.6 MB of GF(p) total: above codec.RESULT_STREAM_BYTES


def test_a_streamed_total_lands_in_a_memory_mapped_npy_equal_to_the_exact_sum(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    xs = client_vectors(3, D_STREAMED, seed=1)
    out, saved = tmp_path / "out" / "total.npy", tmp_path / "out" / "result.npz"
    out.parent.mkdir()

    async def body(aggs: list[Any], collector: Any) -> Any:
        result = await collector.aggregate_async("r", timeout=60.0, out=out)
        assert aggs[0].rounds["r"].state is RoundState.DONE
        assert aggs[0].result_parts("r").length > codec.RESULT_STREAM_BYTES  # streamed
        return result

    result = fed.round("r", xs, body)
    assert isinstance(result.total, np.memmap) and isinstance(result.field_total, np.memmap)
    exact = xs.sum(axis=0)
    assert np.array_equal(np.load(out), exact)
    assert np.array_equal(result.total, exact)
    assert np.array_equal(fed.topology.encoding.decode(np.asarray(result.field_total)), exact)
    assert result.num_clients == 3 and len(result.statements) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["total.npy"]  # nothing else left
    result.save(saved)
    assert verify_saved(fed.topology, saved).dim == D_STREAMED
    assert np.array_equal(load_and_verify(fed.topology, saved).total, exact)
    # A saved file whose total changed in one late value no longer verifies.
    with np.load(saved) as data:
        field_total = np.array(data["field_total"])
        round_id, statements = data["round_id"], data["statements"]
    field_total[-1] ^= 1
    forged = tmp_path / "forged.npz"
    np.savez(forged, round_id=round_id, field_total=field_total, statements=statements)
    with pytest.raises(ResultMismatch) as caught:
        verify_saved(fed.topology, forged)
    assert caught.value.fields == ("total_digest",)


def lying_leader(agg: Any, change: str) -> None:
    """Make aggregator ``agg`` stream a result whose total differs late in the body (its
    statement stays honest)."""
    honest = agg.result_parts

    def lying(round_id: str) -> codec.ResultParts:
        parts = honest(round_id)
        forged = np.array(parts.total, copy=True)
        forged[-1] = forged[-1] ^ 1 if change == "value" else field.P
        return codec.ResultParts(parts.head, forged)

    agg.result_parts = lying


@pytest.mark.parametrize("change", ["value", "non_element"])
def test_a_leader_that_changes_a_late_value_is_refused_and_leaves_no_file(
    tmp_path: Path, change: str
) -> None:
    fed = Federation(tmp_path)
    xs = client_vectors(2, D_STREAMED, seed=2)
    out = tmp_path / "out" / "total.npy"
    out.parent.mkdir()

    async def body(aggs: list[Any], collector: Any) -> BaseException:
        lying_leader(aggs[0], change)
        with pytest.raises((ResultMismatch, MalformedUpload)) as caught:
            await collector.aggregate_async("r", timeout=60.0, out=out)
        return caught.value

    refused = fed.round("r", xs, body)
    if change == "value":
        assert isinstance(refused, ResultMismatch) and refused.fields == ("total_digest",)
    else:
        assert isinstance(refused, MalformedUpload) and "not below p" in str(refused)
    assert list(out.parent.iterdir()) == []


def test_a_stream_cut_mid_body_is_fetched_again_and_then_refused_cleanly(
    tmp_path: Path, monkeypatch
) -> None:
    fed = Federation(tmp_path)
    xs = client_vectors(2, D_STREAMED, seed=3)
    out = tmp_path / "out" / "total.npy"
    out.parent.mkdir()
    honest = aiohttp.StreamReader.readexactly
    cuts: dict[str, Any] = {"left": 0, "seen": []}

    async def cut_once(self: aiohttp.StreamReader, n: int) -> bytes:
        if n >= 1 << 20 and cuts["left"]:  # a slice of the total, not the head
            cuts["left"] -= 1
            cuts["seen"].append(sorted(p.name for p in out.parent.iterdir()))
            raise aiohttp.ClientPayloadError("Response payload is not completed")
        return await honest(self, n)

    monkeypatch.setattr(aiohttp.StreamReader, "readexactly", cut_once)

    async def body(aggs: list[Any], collector: Any) -> Any:
        cuts["left"] = 1  # from now on (the uploads are in)
        first = await collector.aggregate_async("r", timeout=60.0, out=out)
        cuts["left"] = 10  # every attempt cut now: refused after the retries
        second = tmp_path / "out" / "again.npy"
        with pytest.raises(AggregatorUnavailable):
            await collector.aggregate_async("r", timeout=60.0, out=second)
        return first

    result = fed.round("r", xs, body)
    assert len(cuts["seen"][0]) == 1 and cuts["seen"][0][0].endswith(".partial")
    assert np.array_equal(np.load(out), xs.sum(axis=0))
    assert np.array_equal(result.total, xs.sum(axis=0))
    assert sorted(p.name for p in out.parent.iterdir()) == ["total.npy"]


def test_without_out_a_streamed_body_is_read_whole_as_before(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    xs = client_vectors(2, D_STREAMED, seed=4)

    async def body(aggs: list[Any], collector: Any) -> Any:
        return await collector.aggregate_async("r", timeout=60.0)

    result = fed.round("r", xs, body)
    assert not isinstance(result.total, np.memmap)
    assert np.array_equal(result.total, xs.sum(axis=0))


def test_out_must_name_an_npy_in_an_existing_directory(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    collector = fed.deployment.collector()
    with pytest.raises(UsageError, match="written as .npy"):
        collector.aggregate("r", out=tmp_path / "total.csv")
    with pytest.raises(UsageError, match="does not exist"):
        collector.aggregate("r", out=tmp_path / "nowhere" / "total.npy")
    assert not os.path.exists(tmp_path / "total.csv")


# --------------------------------------------------------------------------- partial files

ENCODING = FixedPointEncoding(frac_bits=16, coord_clip=1000.0)


def names_then_fresh(planted: Path):
    """A ``_partial_name`` that first returns ``planted``, then fresh names."""
    real = collector_module._partial_name
    calls = {"n": 0}

    def name(target: Path) -> Path:
        calls["n"] += 1
        return planted if calls["n"] == 1 else real(target)

    return name


def test_a_symlink_planted_at_the_partial_name_is_never_followed(
    tmp_path: Path, monkeypatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours to overwrite")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "total.npy"
    planted = out / f".total.npy.{os.getpid()}-deadbeef.partial"
    planted.symlink_to(victim)
    monkeypatch.setattr(collector_module, "_partial_name", names_then_fresh(planted))
    values = np.arange(1000, dtype=np.uint64)
    streamed = collector_module._StreamedTotal(target, ENCODING, 1000)
    streamed.write(values)
    total, _ = streamed.publish()
    assert victim.read_bytes() == b"not yours to overwrite"
    assert streamed.partial != planted  # another name was drawn
    assert planted.is_symlink() and planted.readlink() == victim
    assert np.array_equal(np.load(target), ENCODING.decode(values))
    assert np.array_equal(total, ENCODING.decode(values))
    # The header is the one numpy's open_memmap writes.
    reference = tmp_path / "reference.npy"
    np.lib.format.open_memmap(reference, mode="w+", dtype=np.float64, shape=(1000,))
    head = len(target.read_bytes()) - 8000
    assert target.read_bytes()[:head] == reference.read_bytes()[:head]

    # AggregateResult.save writes through a partial file of its own the same way.
    saved = out / "result.npz"
    planted_npz = out / f".result.npz.{os.getpid()}-deadbeef.partial"
    planted_npz.symlink_to(victim)
    monkeypatch.setattr(collector_module, "_partial_name", names_then_fresh(planted_npz))
    AggregateResult("r", total, values, 2, 0, None, None).save(saved)
    assert victim.read_bytes() == b"not yours to overwrite"
    with np.load(saved) as data:
        assert np.array_equal(data["field_total"], values)

    # Every name drawn taken: refused, nothing written anywhere.
    monkeypatch.setattr(collector_module, "_partial_name", lambda target: planted)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError):
        collector_module._StreamedTotal(out / "again.npy", ENCODING, 10)
    assert victim.read_bytes() == b"not yours to overwrite"
    assert sorted(p.name for p in out.iterdir()) == before


KILLED_COLLECTOR = """
import os, signal, sys
from pathlib import Path
import numpy as np
from mpc_agg.collector import _StreamedTotal
from mpc_agg.core.encoding import FixedPointEncoding
streamed = _StreamedTotal(Path(sys.argv[1]), FixedPointEncoding(frac_bits=16), 1000)
streamed.write(np.arange(500, dtype=np.uint64))
os.kill(os.getpid(), signal.SIGKILL)
"""

NEXT_COLLECTOR = """
import sys
from pathlib import Path
from mpc_agg.collector import _StreamedTotal
from mpc_agg.core.encoding import FixedPointEncoding
_StreamedTotal(Path(sys.argv[1]), FixedPointEncoding(frac_bits=16), 10).discard()
"""


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_a_partial_file_left_by_a_killed_collector_is_deleted_by_the_next(tmp_path: Path) -> None:
    target = tmp_path / "total.npy"
    killed = subprocess.run([sys.executable, "-c", KILLED_COLLECTOR, str(target)], check=False)
    assert killed.returncode == -signal.SIGKILL
    (left,) = partials(tmp_path)
    assert left.startswith(".total.npy.") and not target.exists()
    gone = int(left.split(".")[3].split("-")[0])  # the killed collector's pid
    # Not stale, or not this target's: a live process's (this test's), another file's, names
    # that only look alike.
    hour_ago = time.time() - 3600
    kept = [
        f".total.npy.{os.getpid()}-0123abcd.partial",
        f".other.npy.{gone}-0123abcd.partial",
        f"total.npy.{gone}-0123abcd.partial",
        f".total.npy.{gone}-0123abcd.partial.keep",
        f".total.npy.{gone}-0123ABCD.partial",
    ]
    for name in kept:
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (hour_ago, hour_ago))
    subprocess.run([sys.executable, "-c", NEXT_COLLECTOR, str(target)], check=True)
    assert partials(tmp_path) == sorted(n for n in kept if n.endswith(".partial"))
    assert (tmp_path / f".total.npy.{gone}-0123abcd.partial.keep").exists()


def test_the_sweep_spares_this_processs_own_partials_and_recent_ones(tmp_path: Path) -> None:
    """In process: a stale name with this process's id that it did not make (an earlier
    process had the id) is deleted, as is one of a dead process; one it made itself, or any
    written since it loaded the collector, is not, whatever its pid."""
    target = tmp_path / "total.npy"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        check=True,
        text=True,
    )
    gone = int(dead.stdout)
    hour_ago = time.time() - 3600
    mine, fd = collector_module._create_partial(target)
    os.close(fd)
    earlier = tmp_path / f".total.npy.{os.getpid()}-0123abcd.partial"
    stale = tmp_path / f".total.npy.{gone}-0123abcd.partial"
    fresh = tmp_path / f".total.npy.{gone}-0123abce.partial"
    link = tmp_path / f".total.npy.{gone}-0123abcf.partial"
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    for p in (earlier, stale, fresh):
        p.write_bytes(b"")
    link.symlink_to(victim)
    for p in (mine, earlier, stale):
        os.utime(p, (hour_ago, hour_ago))
    os.utime(link, (hour_ago, hour_ago), follow_symlinks=False)
    collector_module._sweep_partials(target)
    assert mine.exists() and fresh.exists()
    assert not earlier.exists() and not stale.exists() and not link.is_symlink()
    assert victim.read_bytes() == b"x"  # the symlink went, not what it pointed to


def test_the_sweep_spares_a_partial_whose_collector_holds_its_lock(tmp_path: Path) -> None:
    """Across PID namespaces (containers sharing a volume) a pid proves nothing: a stale-
    looking partial whose pid is unknown here is kept while another process holds its lock
    (as a live collector does for its own partial), and swept once that process is gone."""
    target = tmp_path / "total.npy"
    held = tmp_path / ".total.npy.4194300-0123abcd.partial"  # a pid absent here
    held.write_bytes(b"another collector's total")
    hour_ago = time.time() - 3600
    os.utime(held, (hour_ago, hour_ago))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(held),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        collector_module._sweep_partials(target)
        assert held.read_bytes() == b"another collector's total"
    finally:
        holder.kill()
        holder.wait(timeout=10)
    collector_module._sweep_partials(target)
    assert not held.exists()
