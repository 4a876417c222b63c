"""The benchmark's sections for the remaining performance targets (``sequential``, ``rss``,
``large``, ``cost1e9``) and ``--rings``: their pure pieces (rings, cells, exact inputs and
the block-by-block check, thresholds, fits and the paper cost, targets), the raw TCP
baseline server, and one small run of the new sections against real processes. No timed
asserts: figures are checked for shape and consistency, never for speed."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.config.schema import Topology
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import GF_P61, Z2_32
from scripts.benchmark import workload
from scripts.benchmark.baselines import TcpServer, tcp_sequential_round
from scripts.benchmark.cli import main
from scripts.benchmark.plan import (
    LARGE_CELL,
    check_dims,
    large_rss_target_bytes,
    section_cells,
    small_dims,
)
from scripts.benchmark.report import Progress
from scripts.benchmark.rings import COMPACT_ENCODING, parse_rings, ring_bases, rings_table
from scripts.benchmark.sections.cost import (
    Fit,
    bench_cost,
    cost_table,
    fit_line,
    paper_cost,
    per_coordinate,
)
from scripts.benchmark.sections.flower import bench_flower
from scripts.benchmark.sections.large import (
    check_total,
    large_document,
    plan_large,
    stream_thresholds,
)
from scripts.benchmark.targets import evaluate_targets, rings_of, targets_table

from .conftest import ROOT, pid_alive

GB = 10**9
MiB = 2**20


def base_config() -> dict:
    return yaml.safe_load((ROOT / "configs" / "local-3.yaml").read_text())


# -- rings ---------------------------------------------------------------------------------------


def test_rings_parse_in_the_order_given_each_once():
    assert parse_rings("z2_32, gf_p61,z2_32") == ("z2_32", "gf_p61")
    for bad in ("gf_p62", "", " , "):
        with pytest.raises(ValueError, match="gf_p61"):
            parse_rings(bad)


def test_a_ring_the_base_encoding_fits_keeps_it():
    base = base_config()
    docs, note = ring_bases(base, ("gf_p61",), 10_000)
    assert note is None
    assert docs["gf_p61"]["encoding"] == {**base["encoding"], "ring": "gf_p61"}
    assert "ring" not in base["encoding"]  # the base is left alone


def test_rings_the_base_does_not_fit_all_take_the_compact_encoding():
    docs, note = ring_bases(base_config(), ("gf_p61", "z2_32"), 10_000)
    assert note is not None and "z2_32" in note and "frac_bits 16" in note
    for ring, doc in docs.items():
        enc = doc["encoding"]
        assert enc["ring"] == ring
        assert enc["frac_bits"] == COMPACT_ENCODING["frac_bits"]
        assert enc["coord_clip"] == COMPACT_ENCODING["coord_clip"] and "l2_clip" not in enc
        Topology.from_dict(doc)  # loads, headroom included
    with pytest.raises(ValueError, match="cannot hold"):
        ring_bases(base_config(), ("z2_32",), 10**6)  # 1e6 x 2^16 > 2^31


# -- cells and dimensions ------------------------------------------------------------------------


def test_fixed_shape_sections_have_their_cells_unless_told_otherwise():
    assert section_cells("sequential", None, None) == [(20, 10**6)]
    assert section_cells("rss", None, None) == [(100, 10**6)]
    assert section_cells("large", None, None) == [LARGE_CELL] == [(3, 10**8)]
    assert section_cells("large", None, None, quick=True) == [(3, 10**5)]
    assert section_cells("sequential", [5, 2], None) == [(2, 10**6), (5, 10**6)]
    assert section_cells("large", None, [10**7, 10**8]) == [(3, 10**7), (3, 10**8)]


def test_dimensions_above_1e7_are_for_the_large_section_only():
    check_dims(("large", "cost1e9"), [10**8, 10**9])
    check_dims(("client", "large"), [10**7, 10**8])  # client runs at 1e7 only
    assert small_dims([10**4, 10**7, 10**8]) == [10**4, 10**7]
    with pytest.raises(ValueError, match="for the sections large, cost1e9 only"):
        check_dims(("client", "large"), [10**8])
    with pytest.raises(ValueError, match="not supported"):
        check_dims(("large",), [10**10])
    assert main(["--only", "grid", "--dims", "1e8"]) == 2
    assert main(["--only", "large", "--rings", "gf_p63"]) == 2
    assert main(["--only", "large", "--repeats", "0"]) == 2


# -- exact inputs and the block-by-block check ---------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 60),
    block=st.integers(1, 16),
    frac_bits=st.sampled_from([0, 8, 16, 24]),
    seed=st.integers(0, 2**32),
)
def test_inputs_made_block_by_block_are_the_whole_vector(dim, block, frac_bits, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workload, "INPUT_BLOCK", block)
        whole = workload.client_input(seed, 3, dim, frac_bits)
        blocks = [
            workload.input_block(seed, 3, k, dim, frac_bits)
            for k in range(workload.input_block_count(dim))
        ]
    assert np.array_equal(np.concatenate(blocks), whole)
    assert whole.shape == (dim,) and np.all(whole >= -1.0) and np.all(whole < 1.0)
    units = whole * 2.0**frac_bits
    assert np.array_equal(units, np.round(units))  # multiples of 2^-frac_bits


@settings(max_examples=30, deadline=None)
@given(
    dim=st.integers(1, 300),
    seed=st.integers(0, 2**32),
    ring=st.sampled_from([GF_P61, Z2_32]),
    frac_bits=st.sampled_from([16, 24]),
)
def test_exact_inputs_encode_and_sum_without_rounding(dim, seed, ring, frac_bits):
    if ring is Z2_32 and frac_bits > 16:
        frac_bits = 16
    encoding = FixedPointEncoding(frac_bits=frac_bits, coord_clip=1.0, ring=ring)
    inputs = [workload.client_input(seed, i, dim, frac_bits) for i in range(3)]
    rng = np.random.default_rng(seed)
    shares = [encoding.encode(x, rng) for x in inputs]
    total = encoding.decode(ring.sum_vectors(shares))
    assert np.array_equal(total, inputs[0] + inputs[1] + inputs[2])


def test_a_block_outside_the_vector_is_refused():
    with pytest.raises(ValueError, match="outside"):
        workload.input_block(0, 0, 1, workload.INPUT_BLOCK, 16)


def test_the_check_finds_every_coordinate_that_differs(tmp_path, monkeypatch):
    monkeypatch.setattr(workload, "INPUT_BLOCK", 5)
    monkeypatch.setattr("scripts.benchmark.sections.large.INPUT_BLOCK", 5)
    dim, clients, seed, frac_bits = 23, 3, 7, 24
    exact = sum(workload.client_input(seed, i, dim, frac_bits) for i in range(clients))
    path = tmp_path / "total.npy"
    np.save(path, exact)
    assert check_total(path, clients, dim, seed, frac_bits) == {
        "exact": True,
        "mismatches": 0,
        "max_abs_error": 0.0,
    }
    wrong = exact.copy()
    wrong[[0, 11, 22]] += [2.0**-24, -0.5, 1.0]
    np.save(path, wrong)
    got = check_total(path, clients, dim, seed, frac_bits)
    assert got["exact"] is False and got["mismatches"] == 3 and got["max_abs_error"] == 1.0
    np.save(path, exact[:-1])
    assert check_total(path, clients, dim, seed, frac_bits)["exact"] is False
    assert check_total(path, 2, dim, seed, frac_bits)["exact"] is False  # a client missing


# -- the large section's plan --------------------------------------------------------------------


def test_the_large_topology_changes_only_max_dim_ports_and_data_dir(tmp_path):
    base = base_config()
    doc = large_document(base, 10**8, tmp_path / "data")
    topo = Topology.from_dict(doc)
    assert topo.rounds.max_dim == 10**8 and doc["data_dir"] == str(tmp_path / "data")
    assert topo.name == base["name"] and topo.encoding.frac_bits == 24
    assert topo.rounds.max_clients == base["rounds"]["max_clients"]
    for key in ("threshold", "fsync", "encoding"):
        assert doc[key] == base[key]
    assert {a.http_port for a in topo.aggregators}.isdisjoint({8701, 8702, 8703})
    assert large_document(base, 10, tmp_path)["rounds"]["max_dim"] == base["rounds"]["max_dim"]


def test_thresholds_are_lowered_only_where_d_would_not_stream():
    assert stream_thresholds(10**8, 8, None) == (None, None, None)  # 800 MB: both stream
    party, client, why = stream_thresholds(10**5, 8, None)
    assert party == pytest.approx(4e5 / MiB) and client == 400_000 and why
    party, client, why = stream_thresholds(10**7, 4, None)  # 40 MB: parties stream already
    assert party is None and client == 20_000_000
    assert stream_thresholds(10**8, 8, 2.0) == (2.0, 2 * MiB, "--stream-above-mb")


def test_a_large_cell_that_cannot_fit_says_why():
    assert plan_large(3, 10**8, 8, 3, memory=20 * GB, disk=100 * GB) is None
    why = plan_large(3, 10**9, 8, 3, memory=20 * GB, disk=100 * GB)
    assert why is not None and "memory" in why and "disk" not in why
    why = plan_large(3, 10**8, 8, 3, memory=None, disk=2 * GB)
    assert why is not None and "disk" in why
    assert large_rss_target_bytes(10**8) == 1_800_000_000


# -- fits and the paper cost ----------------------------------------------------------------------


def test_a_line_is_fitted_through_the_large_dimensions():
    fit = fit_line([(10**4, 9.0), (10**6, 1.0 + 2e-6 * 10**6), (10**7, 1.0 + 2e-6 * 10**7)], "x")
    assert fit is not None and fit.dims == (10**6, 10**7)  # d >= 1e6 only
    assert fit.intercept == pytest.approx(1.0) and fit.slope == pytest.approx(2e-6)
    assert fit.at(10**9) == pytest.approx(2001.0)
    assert "fit" in fit.source and "1e6/1e7" in fit.source
    one = fit_line([(10**8, 2.0)], "large", intercept=1.0)
    assert one == Fit(1.0, 1e-8, (10**8,), "large") and "one d" in one.source
    assert fit_line([], "x") is None
    fell = fit_line([(10**6, 5.0), (10**7, 4.0)], "x")  # noise: the largest d alone
    assert fell is not None and fell.dims == (10**7,) and fell.slope == pytest.approx(4e-7)


def large_row(dim: int, scale: float) -> dict:
    """A large row whose costs grow linearly: scale = dim / 1e7."""
    return {
        "ring": "gf_p61",
        "clients": 3,
        "dim": dim,
        "status": "ok",
        "phases": {"uploads_s": 10.0 * scale, "start_s": 2.0},
        "client_submit_s": [5.0 * scale, 6.0 * scale, 4.0 * scale],
        "collector_aggregate_s": 3.0 * scale,
        "aggregator_idle_rss_bytes": [100e6, 100e6, 100e6],
        "aggregator_peak_rss_bytes": [100e6 + 16 * dim, 100e6 + 12 * dim, None],
        "data_dir_peak_bytes": [8 * dim, 16 * dim, 0],
        "client_start_rss_bytes": [60e6] * 3,
        "client_peak_rss_bytes": [60e6 + 9 * dim] * 3,
        "collector_start_rss_bytes": 60e6,
        "collector_peak_rss_bytes": 120e6,
    }


def test_the_paper_cost_scales_what_was_measured_to_1e9():
    results = {
        "client": [{"dim": 10**7, "prepare_s": 0.2}],  # rows of older runs: gf_p61
        "ingest": [
            {"dim": 10**7, "kind": "full", "fsync": True, "inflight": 1, "per_client_s": 0.1},
            {"dim": 10**7, "kind": "seed", "fsync": True, "inflight": 1, "per_client_s": 0.02},
            {"dim": 10**7, "kind": "full", "fsync": False, "inflight": 1, "per_client_s": 9.0},
        ],
        "reveal": [{"dim": 10**6, "reveal_s": 0.1}, {"dim": 10**7, "reveal_s": 1.0}],
        "large": [large_row(10**7, 1.0), large_row(10**8, 10.0)],
    }
    pc = per_coordinate(results, "gf_p61")
    assert pc.large_clients == 3 and pc.itemsize == 8
    rows = {(r["role"], r["what"]): r for r in paper_cost(pc)}

    def value(role: str, start: str) -> float:
        (row,) = [r for (ro, w), r in rows.items() if ro == role and w.startswith(start)]
        return row["value"]

    assert value("client", "submit") == pytest.approx(600.0)  # the slowest: 6 s at 1e7
    assert value("client", "prepare") == pytest.approx(20.0)
    assert value("client", "peak memory") == pytest.approx(60e6 + 9 * GB)
    assert value("client", "sent") == pytest.approx(8 * GB, rel=1e-6)
    assert value("aggregator", "ingest") == pytest.approx(10.0 + 2 * 2.0)
    assert value("aggregator", "reveal") == pytest.approx(100.0)
    assert value("aggregator", "peak memory") == pytest.approx(100e6 + 16 * GB)
    assert value("aggregator", "peak disk") == pytest.approx(16 * GB)
    assert value("aggregator", "sent") == 16 * GB
    assert value("collector", "close") == pytest.approx(300.0)
    assert value("collector", "disk") == 16 * GB
    assert value("round", "3 clients") == pytest.approx(1000.0 + 300.0)
    assert rows[("client", "submit, streamed (share + upload)")]["per_coordinate"] == (
        pytest.approx(600.0)  # ns per coordinate
    )
    z = {r["what"]: r for r in paper_cost(per_coordinate(results, "z2_32"))}
    assert z["reveal"]["value"] is None and z["reveal"]["how"] == "not measured"
    assert z["sent"]["value"] == pytest.approx(4 * GB, rel=1e-6)
    costs = bench_cost(results, ["gf_p61", "z2_32"])
    text = cost_table(costs)
    assert "[gf_p61]" in text and "[z2_32]" in text and "not measured" in text
    json.dumps(costs)  # goes into the JSON as it is


# -- targets ---------------------------------------------------------------------------------


def test_the_new_targets_are_judged_per_ring():
    results = {
        "sequential": [
            {"ring": "gf_p61", "clients": 20, "dim": 10**6, "ratio_vs_tcp": 2.5},
            {"ring": "z2_32", "clients": 20, "dim": 10**6, "ratio_vs_tcp": 3.5},
        ],
        "rss": [
            {
                "ring": "gf_p61",
                "clients": 100,
                "dim": 10**6,
                "peak_rss_bytes": [200e6, 240e6, None],
                "rss_target_bytes": 232e6,
            }
        ],
        "large": [
            {
                "ring": "z2_32",
                "clients": 3,
                "dim": 10**8,
                "status": "ok",
                "round_s": 100.0,
                "aggregator_peak_rss_bytes": [1.0e9, 1.2e9, 0.9e9],
                "rss_target_bytes": 1.8e9,
            },
            {"ring": "gf_p61", "clients": 3, "dim": 10**8, "status": "skipped", "reason": "x"},
        ],
    }
    assert rings_of(results) == ["gf_p61", "z2_32"]
    got = {t["target"]: (t["value"], t["verdict"]) for t in evaluate_targets(results)}
    seq = "20 x 1e6 one after another <= 3x raw TCP float32 stream"
    assert got[seq + " [gf_p61]"] == ("2.50x", "met")
    assert got[seq + " [z2_32]"] == ("3.50x", "NOT met")
    rss = "aggregator peak RSS (VmHWM) at 100 x 1e6 <= 4*d*8 B + 200 MB"
    assert got[rss + " [gf_p61]"] == ("240 MB of 232 MB", "NOT met")
    assert got[rss + " [z2_32]"] == ("n/a", "n/a")
    large = "large 3 x 1e8 (default topology, max_dim raised) completes exactly"
    assert got[large + " [z2_32]"] == ("exact in 100.00 s", "met")
    assert got[large + " [gf_p61]"] == ("skipped", "NOT met")
    mem = "large 3 x 1e8: aggregator peak RSS <= 2*d*8 B + 200 MB"
    assert got[mem + " [z2_32]"] == ("1200 MB of 1800 MB", "met")
    text = targets_table(evaluate_targets(results))
    assert seq in text and "other targets not measured" in text and "seed expansion" not in text


def test_the_rings_side_by_side_take_d_1e6_and_the_ratio_to_the_first():
    results = {
        "client": [
            {"ring": "gf_p61", "dim": 10**6, "ns_per_coordinate": 20.0, "full_share_bytes": 8e6},
            {"ring": "z2_32", "dim": 10**6, "ns_per_coordinate": 8.0, "full_share_bytes": 4e6},
            {"ring": "z2_32", "dim": 10**7, "ns_per_coordinate": 1.0, "full_share_bytes": 4e7},
        ],
        "grid": [
            {"ring": "gf_p61", "clients": 10, "dim": 10**6, "status": "ok", "round_s": 0.8},
            {"ring": "z2_32", "clients": 10, "dim": 10**6, "status": "ok", "round_s": 0.4},
        ],
    }
    lines = rings_table(results, ["gf_p61", "z2_32"]).splitlines()
    prepare = next(ln for ln in lines if ln.startswith("Client.prepare"))
    assert "20.0 ns" in prepare and "8.0 ns" in prepare and prepare.endswith("0.40x")
    e2e = next(ln for ln in lines if ln.startswith("end to end 10 x 1e6"))
    assert e2e.endswith("0.50x")


def test_flower_is_put_next_to_every_ring_of_its_cell(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text("import json\nprint(json.dumps({'seconds': 2.0, 'num_shares': 10}))\n")
    grid = [
        {"ring": "gf_p61", "clients": 10, "dim": 100, "status": "ok", "round_s": 0.5},
        {"ring": "z2_32", "clients": 10, "dim": 100, "status": "ok", "round_s": 0.25},
    ]
    out: list[dict] = []
    bench_flower([(10, 100)], script, 30.0, grid, Progress(io.StringIO()), lambda: None, out)
    (row,) = out
    assert row["status"] == "ok" and row["mpc_agg_s"] == 0.5 and row["ratio"] == 4.0
    assert [g["flower_ratio"] for g in grid] == [4.0, 8.0]
    assert all(g["flower_s"] == 2.0 for g in grid)


# -- the raw TCP baseline --------------------------------------------------------------------


def test_the_raw_tcp_baseline_adds_float32_vectors_one_after_another():
    vectors = [np.random.default_rng(i).uniform(-1, 1, 1000) for i in range(4)]
    server = TcpServer()
    server.start()
    try:
        wall, total = asyncio.run(tcp_sequential_round(server.port, vectors, timeout_s=30))
        assert wall > 0
        wire = [v.astype(np.float32).astype(np.float64) for v in vectors]  # float32 on the wire
        assert np.array_equal(total, ((wire[0] + wire[1]) + wire[2]) + wire[3])
        _, total = asyncio.run(tcp_sequential_round(server.port, vectors[:2], timeout_s=30))
        assert np.array_equal(total, wire[0] + wire[1])  # a new round starts from zero
    finally:
        server.stop()
    assert not pid_alive(server.pid)


# -- the new sections, end to end -----------------------------------------------------------------


@pytest.mark.processes
def test_small_run_of_the_new_sections_is_exact_and_stops_its_processes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.benchmark",
            "--only",
            "sequential,rss,large,cost1e9",
            "--dims",
            "2e4",
            "--clients",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("sequential: clients one after another", "rss: every aggregator", "large:"):
        assert title in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["failures"] == []
    (seq,) = doc["sequential"]
    assert (seq["clients"], seq["dim"], seq["ring"]) == (2, 20_000, "gf_p61")
    assert seq["round_s"] > 0 and seq["tcp_s"] > 0 and seq["ratio_vs_tcp"] > 0
    assert seq["max_abs_error"] <= seq["error_bound"]
    (rss,) = doc["rss"]
    assert len(rss["peak_rss_bytes"]) == 3
    assert all(p >= i for p, i in zip(rss["peak_rss_bytes"], rss["idle_rss_bytes"], strict=True))
    (large,) = doc["large"]
    assert large["status"] == "ok" and large["check"]["exact"] and large["num_clients"] == 2
    assert all(large["client_streamed"])  # thresholds lowered: d = 2e4 streams
    assert large["party_stream_above_mb"] is not None
    assert large["upload_bytes"] >= 2 * 8 * 20_000
    assert len(large["aggregator_peak_rss_bytes"]) == 3 and large["collector_peak_rss_bytes"]
    assert max(large["data_dir_peak_bytes"]) > 0
    assert doc["cost1e9"]["gf_p61"]["paper"]
    verdicts = {t["target"]: t["verdict"] for t in doc["targets"]}
    assert verdicts["large 2 x 20000 (default topology, max_dim raised) completes exactly"] == (
        "met"
    )
    pids = doc["processes"]["aggregators"] + large["aggregator_pids"]
    assert len(pids) == 9
    assert not any(pid_alive(p) for p in pids)
    assert not (tmp_path / "work" / "large-gf_p61-2x20000" / "data").exists()
