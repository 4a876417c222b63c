"""The benchmark (``scripts.benchmark``, run as ``python scripts/bench.py``): its pure pieces
(planning, formatting, parsing, targets), the in-process ingest path, and smoke runs of the
script against real aggregator processes."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mpc_agg import Topology
from scripts.benchmark.cli import main
from scripts.benchmark.plan import (
    FULL_CLIENTS,
    FULL_DIMS,
    MUST_RUN,
    cell_disk_bytes,
    cell_memory_bytes,
    estimate_round_seconds,
    flower_cells,
    grid_cells,
    parse_sections,
    plan_cell,
    rss_target_bytes,
)
from scripts.benchmark.procs import parse_proc_status
from scripts.benchmark.report import (
    Progress,
    fmt_bytes,
    fmt_dim,
    fmt_ratio,
    fmt_seconds,
    format_table,
    one_line,
    parse_count,
    ratio,
)
from scripts.benchmark.sections.flower import flower_table, parse_last_json_line, run_flower_cell
from scripts.benchmark.sections.grid import grid_table
from scripts.benchmark.sections.ingest import ingest_times
from scripts.benchmark.targets import evaluate_targets
from scripts.benchmark.workload import topology_document

from .conftest import ROOT, pid_alive

GiB = 1024**3


# -- formatting ------------------------------------------------------------------------------


def test_dimensions_print_as_powers_of_ten_and_parse_back():
    assert [fmt_dim(d) for d in (10**4, 10**7, 12345, 1)] == ["1e4", "1e7", "12345", "1"]
    assert [parse_count(t) for t in ("1e5", "100000", "100_000", "10")] == [10**5] * 3 + [10]
    for bad in ("0", "-3", "1.5", "ten", "1e-2"):
        with pytest.raises(ValueError):
            parse_count(bad)


def test_seconds_bytes_and_ratios_format_with_units():
    assert fmt_seconds(2.5e-6) == "2.5 µs"
    assert fmt_seconds(0.0123) == "12.3 ms"
    assert fmt_seconds(12.345) == "12.35 s"
    assert fmt_seconds(None) == "n/a"
    assert fmt_bytes(232 * 10**6) == "232.0 MB"
    assert fmt_bytes(8 * 10**9) == "8.00 GB"
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None
    assert [fmt_ratio(r) for r in (2.3456, 23.456, 1234.5, None)] == [
        "2.35x",
        "23.5x",
        "1234x",
        "n/a",
    ]


def test_table_aligns_columns_and_refuses_ragged_rows():
    text = format_table("title", ["d", "time"], [["1e4", "1.0 ms"], ["1e10", "12.0 s"]])
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[2] == "d       time"
    assert lines[4] == "1e4   1.0 ms"  # first column left, the others right-aligned
    assert lines[5] == "1e10  12.0 s"
    assert lines[1] == lines[3] == lines[-1] == "-" * len(lines[2])
    with pytest.raises(ValueError, match="2 columns"):
        format_table("t", ["a", "b"], [["only one"]])


def test_one_line_keeps_first_and_last_line():
    assert one_line("boom") == "boom"
    assert one_line("LaunchError: x\nTraceback\n  File\nAttributeError: y\n") == (
        "LaunchError: x ... AttributeError: y"
    )
    assert len(one_line("x" * 1000, limit=50)) == 50


# -- memory and planning ---------------------------------------------------------------------

STATUS = """Name:\tpython
State:\tS (sleeping)
VmPeak:\t 1234567 kB
VmHWM:\t  204800 kB
VmRSS:\t  102400 kB
Threads:\t5
voluntary_ctxt_switches:\t10
"""


def test_proc_status_fields_in_kilobytes_become_bytes():
    fields = parse_proc_status(STATUS)
    assert fields["VmHWM"] == 204800 * 1024
    assert fields["VmRSS"] == 102400 * 1024
    assert "Threads" not in fields and "Name" not in fields and "State" not in fields
    assert parse_proc_status("") == {}
    meminfo = "MemTotal:       24684092 kB\nMemAvailable:   24385068 kB\nHugePages_Total:       0\n"
    assert parse_proc_status(meminfo)["MemAvailable"] == 24385068 * 1024


def test_rss_target_is_four_words_per_coordinate_plus_200_mb():
    assert rss_target_bytes(10**6) == 32 * 10**6 + 200 * 10**6
    assert rss_target_bytes(10**7) == 520 * 10**6


def test_estimate_scales_with_clients_at_the_same_dimension():
    measured = [(10, 10**5, 1.0), (100, 10**5, 5.0), (10, 10**4, 0.2)]
    # the round of the same d with the most clients: 0.05 s per client
    assert estimate_round_seconds(measured, 1000, 10**5) == pytest.approx(50.0)


def test_estimate_scales_linearly_from_the_largest_smaller_dimension():
    measured = [(10, 10**4, 0.1), (100, 10**5, 10.0)]
    # 0.1 s per client at 1e5, times 10 for 1e6
    assert estimate_round_seconds(measured, 10, 10**6) == pytest.approx(10.0)
    assert estimate_round_seconds(measured, 10, 10**3) is None
    assert estimate_round_seconds([], 10, 10**4) is None


def plan(**changes):
    args = dict(
        estimate_s=10.0,
        budget_s=300.0,
        memory_bytes=GiB,
        available_memory_bytes=20 * GiB,
        disk_bytes=GiB,
        free_disk_bytes=50 * GiB,
        must_run=False,
    )
    args.update(changes)
    return plan_cell(100, 10**6, **args)


def test_cells_within_budget_and_resources_run():
    p = plan()
    assert p.run and p.reason is None and p.estimate_s == 10.0
    assert plan(estimate_s=None).run  # nothing measured yet: try it


def test_cells_over_budget_are_skipped_with_the_estimate_unless_they_must_run():
    p = plan(estimate_s=1000.0)
    assert not p.run
    assert "estimated 1000 s > cell budget 300 s" in p.reason
    assert plan(estimate_s=1000.0, must_run=True).run


def test_cells_that_cannot_fit_are_skipped_even_if_they_must_run():
    p = plan(memory_bytes=30 * GiB, must_run=True)
    assert not p.run and "memory" in p.reason
    p = plan(disk_bytes=80 * GiB, estimate_s=1000.0)
    assert not p.run and "disk" in p.reason and "budget" in p.reason
    assert plan(available_memory_bytes=None, free_disk_bytes=None).run  # unknown: try


def test_memory_and_disk_needs_grow_with_d_and_clients():
    assert cell_memory_bytes(10**7, 3, 4) > cell_memory_bytes(10**6, 3, 4)
    assert cell_memory_bytes(10**6, 3, 8) > cell_memory_bytes(10**6, 3, 4)
    assert cell_memory_bytes(10**7, 3, 4) < 16 * GiB  # the must-run cell fits here
    assert cell_disk_bytes(1000, 10**7) > 80 * 10**9  # the 1000 x 1e7 journals do not


def test_grid_runs_by_dimension_then_clients_and_flower_keeps_its_cells():
    cells = grid_cells([1000, 10, 100], [10**5, 10**4])
    assert cells == [(10, 10**4), (100, 10**4), (1000, 10**4), (10, 10**5), (100, 10**5)] + [
        (1000, 10**5)
    ]
    assert flower_cells([10, 100, 1000], [10**4, 10**7]) == [(10, 10**4), (100, 10**4)]
    assert set(MUST_RUN) <= set(grid_cells(FULL_CLIENTS, FULL_DIMS))


def test_sections_parse_in_run_order():
    assert parse_sections("grid, client") == ("client", "grid")
    with pytest.raises(ValueError, match="unknown"):
        parse_sections("client,gird")
    with pytest.raises(ValueError):
        parse_sections(" , ")


def test_last_json_line_is_the_result():
    out = 'log line\n{"not": "this"}\nmore\n{"seconds": 1.5, "num_shares": 10}\n\n'
    assert parse_last_json_line(out) == {"seconds": 1.5, "num_shares": 10}
    assert parse_last_json_line('{"seconds": 1}\ntrailing text') is None
    assert parse_last_json_line("[1, 2]") is None
    assert parse_last_json_line("") is None


def test_topology_document_moves_the_base_to_fresh_ports_with_room_for_the_grid(tmp_path):
    base = yaml.safe_load((ROOT / "configs" / "local-3.yaml").read_text())
    doc = topology_document(base, tmp_path / "data", fsync=False)
    topo = Topology.from_dict(doc)
    assert topo.m == 3 and topo.threshold == base["threshold"]
    assert topo.fsync is False and topo.data_dir == tmp_path / "data"
    assert topo.rounds.max_dim >= 10**7 and topo.rounds.max_clients >= 1000
    ports = {a.http_port for a in topo.aggregators} | {a.mpc_port for a in topo.aggregators}
    assert len(ports) == 6 and 8701 not in ports
    assert base["aggregators"][0]["http_port"] == 8701  # the base is left alone


# -- targets -----------------------------------------------------------------------------------


def test_targets_judge_the_figures_and_say_what_was_not_measured():
    results = {
        "ingest": [
            {"dim": 10**6, "kind": "full", "fsync": True, "inflight": 1, "ratio_vs_numpy": 2.5},
            {"dim": 10**5, "kind": "full", "fsync": False, "inflight": 1, "ratio_vs_numpy": 9.0},
        ],
        "seed_expansion": [{"dim": 10**6, "gbps": 3.2}],
        "reveal": [
            {"dim": 10**5, "reveal_s": 0.04, "us_per_element": 0.4},
            {"dim": 10**6, "reveal_s": 0.5, "us_per_element": 0.5},
        ],
        "grid": [
            {
                "clients": 100,
                "dim": 10**6,
                "status": "ok",
                "round_s": 10.0,
                "aggregator_peak_rss_bytes": [300 * 10**6, 200 * 10**6, None],
                "ratio_vs_http": 1.5,
                "flower_ratio": 30.0,
            },
            {"clients": 10, "dim": 10**7, "status": "skipped", "reason": "memory"},
        ],
    }
    got = {t["target"]: (t["value"], t["verdict"]) for t in evaluate_targets(results)}
    assert got["full-share ingest <= 3x numpy add (d=1e6, fsync on, 1 in flight)"] == (
        "2.50x",
        "met",
    )
    assert got["full-share ingest <= 3x numpy add (d=1e5, fsync off, 1 in flight)"][1] == "NOT met"
    assert got["full-share ingest <= 3x numpy add (fsync on, 4 in flight)"] == ("n/a", "n/a")
    assert got["seed expansion >= 1 GB/s per core (d=1e6)"] == ("3.20 GB/s", "met")
    rss = got["aggregator peak RSS <= 4*d*8 B + 200 MB (worst cell)"]
    assert rss == ("1.29x of target at 100 x 1e6", "NOT met")  # 300 MB of 232 MB
    assert got["reveal of d=1e6 among 3 parties <= 1 s"] == ("500.0 ms", "met")
    assert got["reveal linear in d (max/min µs per element, d >= 1e5, within 2x)"][1] == "met"
    assert got["e2e 100 x 1e6 <= 2x plaintext HTTP"] == ("1.50x", "met")
    assert got["e2e 100 x 1e6 >= 5x faster than Flower SecAgg+"] == ("30.0x", "met")
    assert got["round of 10 x 1e7 completes"] == ("skipped", "NOT met")
    assert got["round of 1000 x 1e5 completes"] == ("not selected", "n/a")


def test_targets_of_an_empty_run_are_all_unmeasured():
    targets = evaluate_targets({})
    assert targets and {t["verdict"] for t in targets} == {"n/a"}


def test_tables_render_skipped_and_failed_cells():
    grid = [
        {
            "clients": 10,
            "dim": 10**4,
            "status": "ok",
            "round_s": 0.06,
            "upload_s": 0.05,
            "aggregate_s": 0.005,
            "numpy_s": 3e-5,
            "ratio_vs_numpy": 2000.0,
            "http_s": 0.01,
            "ratio_vs_http": 6.0,
            "aggregator_peak_rss_bytes": [150 * 10**6] * 3,
            "rss_target_bytes": rss_target_bytes(10**4),
            "max_abs_error": 3e-7,
            "flower_s": 0.5,
            "flower_ratio": 8.3,
        },
        {"clients": 1000, "dim": 10**7, "status": "skipped", "reason": "journals need 80 GB"},
    ]
    text = grid_table(grid)
    assert "10 x 1e4" in text and "8.30x" in text
    assert "1000 x 1e7 [gf_p61]: skipped: journals need 80 GB" in text
    flower = [
        {"clients": 100, "dim": 10**6, "status": "skipped", "reason": "timed out after 300 s"},
        {
            "clients": 10,
            "dim": 10**4,
            "status": "ok",
            "seconds": 0.5,
            "max_abs_error": 2e-5,
            "num_shares": 10,
            "reconstruction_threshold": 6,
            "flwr_version": "1.41.0",
            "mpc_agg_s": 0.06,
            "ratio": 8.3,
        },
    ]
    text = flower_table(flower)
    assert "flwr 1.41.0" in text and "timed out after 300 s" in text and "10/6" in text


# -- progress ------------------------------------------------------------------------------


def test_progress_off_a_terminal_prints_quarters_of_long_counts_only():
    out = io.StringIO()
    p = Progress(out)
    p.line("grid 1/2: running")
    for i in range(1, 101):
        p.count("uploading", i, 100)
    for i in range(1, 3):
        p.count("tiny", i, 2)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[0].endswith("s] grid 1/2: running")
    assert [ln.split("] ")[1] for ln in lines[1:]] == [
        f"uploading {n}/100" for n in (25, 50, 75, 100)
    ]


# -- in process: the aggregator's upload path, and the Flower runner's contract ------------------


def test_ingest_drives_the_real_upload_path(tmp_path):
    base = yaml.safe_load((ROOT / "configs" / "local-3.yaml").read_text())
    topo = Topology.from_dict(topology_document(base, tmp_path / "data", fsync=False))
    latencies, wall = asyncio.run(ingest_times(topo, 16, None, 0.0, 2))
    assert len(latencies) == 6 and wall > 0 and all(t > 0 for t in latencies)


def test_flower_runner_reads_the_last_json_line_and_times_out(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(
        "import json, sys, time\n"
        "n = int(sys.argv[sys.argv.index('--clients') + 1])\n"
        "print('starting')\n"
        "if n > 50: time.sleep(30)\n"
        "print(json.dumps({'seconds': 0.25, 'num_shares': n}))\n"
    )
    obj, why = run_flower_cell(script, 10, 100, timeout_s=20)
    assert why is None and obj == {"seconds": 0.25, "num_shares": 10}
    t = time.monotonic()
    obj, why = run_flower_cell(script, 100, 100, timeout_s=0.5)
    assert obj is None and why == "timed out after 0.5 s"
    assert time.monotonic() - t < 10


# -- the script, end to end ---------------------------------------------------------------------


@pytest.mark.processes
def test_quick_reveal_run_writes_the_figures_and_stops_its_processes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--quick",
            "--only",
            "reveal",
            "--dims",
            "1e4",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reveal: 3-party local federation" in proc.stdout
    assert "performance targets: figures to report" in proc.stdout
    assert "reveal: d = 1e4" in proc.stderr  # progress
    doc = json.loads(out.read_text())
    assert {"machine", "settings", "reveal", "grid", "targets", "failures"} <= doc.keys()
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["versions"]["mpyc"]
    assert doc["settings"]["sections"] == ["reveal"] and doc["failures"] == []
    (row,) = doc["reveal"]
    assert row["dim"] == 10**4 and row["clients"] == 2
    assert row["reveal_s"] > 0 and row["close_to_result_s"] > 0 and row["us_per_element"] > 0
    pids = doc["processes"]["aggregators"]
    assert len(pids) == 3
    assert not any(pid_alive(p) for p in pids)


def test_bad_options_exit_with_status_2():
    assert main(["--only", "nothing"]) == 2
    assert main(["--dims", "1e8"]) == 2
    assert main(["--concurrency", "0"]) == 2
    assert main(["--config", str(Path(ROOT / "configs" / "dp-gaussian-3.yaml"))]) == 2


def test_the_package_runs_with_python_m_and_through_the_script():
    commands = (
        [sys.executable, "-m", "scripts.benchmark"],
        [sys.executable, str(ROOT / "scripts" / "bench.py")],
    )
    # Both interpreters start at once (they are independent), then each is checked.
    procs = [
        subprocess.Popen(
            [*command, "--only", "nothing"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 2, stderr[-2000:]
            assert "unknown section" in stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
