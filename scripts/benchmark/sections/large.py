"""Section ``large``: a few clients x a long vector through the streamed paths (issue 15's
target: 3 x 1e8 on the default topology completes exactly, each aggregator's peak RSS
within 2 x 8d + 200 MB).

The topology is the base (``--config``, by default configs/local-3.yaml) with only
``rounds.max_dim`` raised to d, on fresh loopback ports (so that it cannot collide with a
running deployment) and its own ``data_dir`` in the run's directory, started fresh for the
cell (so each aggregator's ``VmHWM`` is its peak over the cell). The clients run at once,
each in its own process (:mod:`..large_worker`), each holding its own input and submitting
it with ``Client.submit``, which streams a full share above its threshold; the collector,
also in its own process, streams the total into a memory-mapped ``.npy``
(``Collector.aggregate(..., out=...)``). The inputs are exact (multiples of 2^-frac_bits,
generated block by block from the seed: :func:`..workload.input_block`), so the checker
compares the file with the sum of the inputs block by block, for equality, holding no
vector-sized array. When d is too small to stream at the default thresholds (16 MiB at the
aggregators, 64 MiB at the client), both are lowered to half a full share, so that the
section always measures the streamed paths (``--stream-above-mb`` sets both).

Reported: time per phase, each aggregator's idle and peak RSS against the target, the
clients' and the collector's peak RSS, the peak disk used under each aggregator's data
directory (sampled every 0.25 s) and by the collector's ``.npy`` (its exact ring total,
``s d`` more bytes, is an unnamed temporary file that no walk of the directory sees), the
bytes each aggregator wrote to storage (``/proc/<pid>/io``), and the bytes sent (clients'
uploads as measured; the reveal and the result from the protocol).
The APIs it needs (``LocalFederation(stream_above_mb=...)``,
``Client(stream_above_bytes=...)``, ``Collector.aggregate(out=...)``) are checked first:
a missing one skips the cell, saying which.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from mpc_agg import Client, Collector
from mpc_agg.core.ring import ring_named
from mpc_agg.launcher import LocalFederation, die_with_parent, free_loopback_ports

from ..plan import MEMORY_HEADROOM, ROOT, large_rss_target_bytes
from ..procs import DiskWatch, available_memory_bytes, dir_bytes, process_io, process_memory
from ..report import (
    MB,
    Progress,
    fmt_bytes,
    fmt_dim,
    fmt_seconds,
    format_table,
    one_line,
)
from ..workload import INPUT_BLOCK, input_block, input_block_count, new_round_id

DEFAULT_PARTY_STREAM_MB = 16.0
"""The parties' default streaming threshold (``mpc-agg party --stream-above-mb``)."""

DEFAULT_CLIENT_STREAM_BYTES = 64 << 20
"""The client's default streaming threshold (``Client(stream_above_bytes=...)``)."""


def missing_apis() -> list[str]:
    """The streaming APIs this section needs that the installed mpc_agg lacks."""
    missing = []
    if "stream_above_mb" not in inspect.signature(LocalFederation.__init__).parameters:
        missing.append("LocalFederation(stream_above_mb=...)")
    if "stream_above_bytes" not in inspect.signature(Client.__init__).parameters:
        missing.append("Client(stream_above_bytes=...)")
    if "out" not in inspect.signature(Collector.aggregate).parameters:
        missing.append("Collector.aggregate(out=...)")
    return missing


def large_document(base: dict[str, Any], dim: int, data_dir: Path) -> dict[str, Any]:
    """``base`` (a parsed topology) with ``rounds.max_dim`` raised to ``dim`` (if it is
    below), on fresh loopback ports, with ``data_dir``: nothing else changes."""
    doc: dict[str, Any] = json.loads(json.dumps(base))
    ports = free_loopback_ports(2 * len(doc["aggregators"]))
    for i, entry in enumerate(doc["aggregators"]):
        entry.update(host="127.0.0.1", mpc_port=ports[2 * i], http_port=ports[2 * i + 1])
    rounds = dict(doc.get("rounds") or {})
    rounds["max_dim"] = max(int(rounds.get("max_dim", 0)), dim)
    doc["rounds"] = rounds
    doc["data_dir"] = str(data_dir)
    return doc


def stream_thresholds(
    dim: int, itemsize: int, stream_above_mb: float | None
) -> tuple[float | None, int | None, str | None]:
    """(the parties' ``--stream-above-mb``, the client's ``stream_above_bytes``, a note):
    None for a default that already streams a full share of ``dim`` elements of
    ``itemsize`` bytes, else half a full share (or ``stream_above_mb`` for both)."""
    full = dim * itemsize
    if stream_above_mb is not None:
        return stream_above_mb, int(stream_above_mb * 2**20), "--stream-above-mb"
    party = None if full > DEFAULT_PARTY_STREAM_MB * 2**20 else full / 2 / 2**20
    client = None if full > DEFAULT_CLIENT_STREAM_BYTES else full // 2
    if party is None and client is None:
        return None, None, None
    return party, client, "lowered to half a full share so that d streams"


def plan_large(
    clients: int, dim: int, itemsize: int, m: int, *, memory: int | None, disk: int
) -> str | None:
    """Why a cell cannot run here (None if it fits): aggregators at their target, clients
    holding their input and a full share's worth of working memory, and on disk one full
    share per client in the spools plus the collector's two files (float64 and ring)."""
    need_memory = m * large_rss_target_bytes(dim) + clients * (8 + itemsize) * dim
    need_disk = clients * itemsize * dim + (8 + itemsize) * dim
    reasons = []
    if memory is not None and need_memory > memory * MEMORY_HEADROOM:
        reasons.append(f"needs about {fmt_bytes(need_memory)} of memory, {fmt_bytes(memory)} free")
    if need_disk > disk * MEMORY_HEADROOM:
        reasons.append(f"needs about {fmt_bytes(need_disk)} of disk, {fmt_bytes(disk)} free")
    return "; ".join(reasons) or None


def check_total(path: Path, clients: int, dim: int, seed: int, frac_bits: int) -> dict[str, Any]:
    """Compare the ``.npy`` at ``path`` with the sum of the clients' inputs, block by block
    (one block of each input at a time): coordinates that differ and the largest difference."""
    total = np.load(path, mmap_mode="r")
    if total.shape != (dim,):
        return {"exact": False, "mismatches": dim, "max_abs_error": None, "shape": total.shape}
    mismatches = 0
    worst = 0.0
    for block in range(input_block_count(dim)):
        expected = input_block(seed, 0, block, dim, frac_bits)
        for i in range(1, clients):
            expected += input_block(seed, i, block, dim, frac_bits)
        start = block * INPUT_BLOCK
        got = np.asarray(total[start : start + expected.shape[0]])
        diff = got != expected
        if diff.any():
            mismatches += int(np.count_nonzero(diff))
            worst = max(worst, float(np.max(np.abs(got - expected))))
    del total
    return {"exact": mismatches == 0, "mismatches": mismatches, "max_abs_error": worst}


def _worker(args: list[str], log: IO[str]) -> subprocess.Popen[str]:
    """A :mod:`..large_worker` process, set up but not started (see :func:`_ready`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.benchmark.large_worker", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        preexec_fn=die_with_parent,
    )


def _ready(proc: subprocess.Popen[str], what: str) -> None:
    """Wait until a worker is set up (it prints ``READY``); RuntimeError if it exits."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.wait()
        raise RuntimeError(f"{what} failed while setting up (exit {proc.returncode}; see its log)")


def _go(proc: subprocess.Popen[str]) -> None:
    """Let a ready worker start."""
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not touch it again


def _figures(proc: subprocess.Popen[str], what: str, timeout_s: float) -> dict[str, Any]:
    """The JSON line a worker printed; RuntimeError if it failed or printed none."""
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s") from None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}; see its log)")
    figures: dict[str, Any] = json.loads(lines[-1])
    return figures


def large_cell(
    base: dict[str, Any],
    ring: str,
    run_dir: Path,
    clients: int,
    dim: int,
    progress: Progress,
    *,
    seed: int,
    stream_above_mb: float | None,
    timeout_s: float,
) -> dict[str, Any]:
    """One cell: the round run and checked, its figures (module docstring); raises on a
    failure (the caller records it)."""
    tag = f"large: {clients} clients x d = {fmt_dim(dim)} [{ring}]"
    run_dir.mkdir(parents=True)
    itemsize = ring_named(ring).itemsize
    party_mb, client_bytes, why = stream_thresholds(dim, itemsize, stream_above_mb)
    doc = large_document(base, dim, run_dir / "data")
    config = run_dir / "topology.yaml"
    config.write_text(yaml.safe_dump(doc))
    out_dir = run_dir / "collector"
    out_dir.mkdir()
    out = out_dir / "total.npy"
    row: dict[str, Any] = {
        "ring": ring,
        "clients": clients,
        "dim": dim,
        "itemsize": itemsize,
        "party_stream_above_mb": party_mb,
        "client_stream_above_bytes": client_bytes,
        "stream_thresholds": why or "defaults",
        "rss_target_bytes": large_rss_target_bytes(dim),
    }
    phases: dict[str, float] = {}
    with (run_dir / "parties.log").open("w") as log, (run_dir / "workers.log").open("w") as wlog:
        options: dict[str, Any] = {} if party_mb is None else {"stream_above_mb": party_mb}
        fed = LocalFederation(config, log_level="warning", output=log, cwd=run_dir, **options)
        watch: DiskWatch | None = None
        t = time.perf_counter()
        try:
            fed.start()
            fed.wait_ready()
            phases["start_s"] = time.perf_counter() - t
            topology = fed.topology
            frac_bits = topology.encoding.frac_bits
            row["aggregator_pids"] = fed.pids
            row["aggregator_idle_rss_bytes"] = [process_memory(p).get("VmRSS") for p in fed.pids]
            data_dirs = [topology.aggregator_dir(i) for i in range(topology.m)]
            watch = DiskWatch([*data_dirs, out_dir])
            watch.start()
            round_id = new_round_id("large")
            t = time.perf_counter()
            fed.collector(timeout_s=timeout_s).open_round(round_id, dim)
            phases["open_s"] = time.perf_counter() - t
            deployment_dir = str(fed.deployment.topology_path.parent)
            common = ["--deployment", deployment_dir, "--round", round_id]
            common += ["--timeout-s", str(timeout_s)]
            progress.line(f"{tag}: {clients} clients making their inputs")
            submit = ["submit", *common, "--dim", str(dim), "--seed", str(seed)]
            submit += ["--frac-bits", str(frac_bits)]
            if client_bytes is not None:
                submit += ["--stream-above-bytes", str(client_bytes)]
            procs = [_worker([*submit, "--index", str(i)], wlog) for i in range(clients)]
            try:
                for i, p in enumerate(procs):
                    _ready(p, f"client {i}")
                progress.line(f"{tag}: {clients} clients submitting at once")
                t = time.perf_counter()
                for p in procs:
                    _go(p)
                row["clients_figures"] = [
                    _figures(p, f"client {i}", timeout_s) for i, p in enumerate(procs)
                ]
                phases["uploads_s"] = time.perf_counter() - t
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            progress.line(f"{tag}: uploads done in {phases['uploads_s']:.1f} s; collecting")
            collector = _worker(["collect", *common, "--out", str(out)], wlog)
            try:
                _ready(collector, "the collector")
                t = time.perf_counter()
                _go(collector)
                row["collector_figures"] = _figures(collector, "the collector", timeout_s)
                phases["collect_s"] = time.perf_counter() - t
            finally:
                if collector.poll() is None:
                    collector.kill()
                    collector.wait()
            memory = [process_memory(p) for p in fed.pids]
            row["aggregator_peak_rss_bytes"] = [m.get("VmHWM") for m in memory]
            row["aggregator_end_rss_bytes"] = [m.get("VmRSS") for m in memory]
            row["aggregator_write_bytes"] = [process_io(p).get("write_bytes") for p in fed.pids]
        finally:
            fed.stop()
            disk_peaks = watch.stop() if watch is not None else []
    row["data_dir_peak_bytes"] = disk_peaks[:-1]
    row["collector_disk_peak_bytes"] = disk_peaks[-1]
    row["data_dir_end_bytes"] = [dir_bytes(d) for d in data_dirs]
    progress.line(f"{tag}: checking the total block by block")
    t = time.perf_counter()
    row["check"] = check_total(out, clients, dim, seed, frac_bits)
    phases["check_s"] = time.perf_counter() - t
    out.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "data", ignore_errors=True)
    figures = row["clients_figures"]
    coll = row["collector_figures"]
    m = len(data_dirs)
    row.update(
        phases=phases,
        round_s=phases["open_s"] + phases["uploads_s"] + phases["collect_s"],
        client_generate_s=[f["generate_s"] for f in figures],
        client_submit_s=[f["submit_s"] for f in figures],
        client_peak_rss_bytes=[f.get("peak_rss_bytes") for f in figures],
        client_start_rss_bytes=[f.get("rss_start_bytes") for f in figures],
        client_ready_rss_bytes=[f.get("rss_ready_bytes") for f in figures],
        client_streamed=[f.get("streamed") for f in figures],
        collector_aggregate_s=coll["aggregate_s"],
        collector_peak_rss_bytes=coll.get("peak_rss_bytes"),
        collector_start_rss_bytes=coll.get("rss_start_bytes"),
        leader_timings=coll.get("timings"),
        num_clients=coll.get("num_clients"),
        upload_bytes=sum(f["upload_bytes"] for f in figures),
        reveal_bytes_model=m * (m - 1) * itemsize * dim,
        result_bytes_model=itemsize * dim,
    )
    peaks = [p for p in row["aggregator_peak_rss_bytes"] if p]
    row["worst_of_target"] = max(peaks) / row["rss_target_bytes"] if peaks else None
    ok = row["check"]["exact"] and row["num_clients"] == clients
    row["status"] = "ok" if ok else "failed"
    if not ok:
        row["reason"] = (
            f"wrong total: {row['num_clients']} clients counted, "
            f"{row['check']['mismatches']} coordinates differ"
        )
    return row


def bench_large(
    bases: Mapping[str, dict[str, Any]],
    workdir: Path,
    cells: Sequence[tuple[int, int]],
    progress: Progress,
    *,
    seed: int,
    stream_above_mb: float | None,
    timeout_s: float | None,
) -> list[dict[str, Any]]:
    """One row per (cell, ring): ``status`` ok, failed or skipped (with ``reason``)."""
    rows: list[dict[str, Any]] = []
    missing = missing_apis()
    for clients, dim in cells:
        for ring, base in bases.items():
            tag = f"large: {clients} clients x d = {fmt_dim(dim)} [{ring}]"
            row: dict[str, Any] = {"ring": ring, "clients": clients, "dim": dim}
            itemsize = ring_named(ring).itemsize
            why = (
                f"mpc_agg lacks {', '.join(missing)}"
                if missing
                else plan_large(
                    clients,
                    dim,
                    itemsize,
                    len(base["aggregators"]),
                    memory=available_memory_bytes(),
                    disk=shutil.disk_usage(workdir).free,
                )
            )
            if why is not None:
                row.update(status="skipped", reason=why)
                progress.line(f"{tag}: skipped: {why}")
                rows.append(row)
                continue
            limit = timeout_s if timeout_s is not None else 600.0 + 2e-5 * clients * dim
            try:
                row = large_cell(
                    base,
                    ring,
                    workdir / f"large-{ring}-{clients}x{dim}",
                    clients,
                    dim,
                    progress,
                    seed=seed,
                    stream_above_mb=stream_above_mb,
                    timeout_s=limit,
                )
            except Exception as exc:  # noqa: BLE001 - reported, and the exit status is 1
                row.update(status="failed", reason=one_line(f"{type(exc).__name__}: {exc}"))
                progress.line(f"{tag}: FAILED: {row['reason']}")
                rows.append(row)
                continue
            rows.append(row)
            progress.line(
                f"{tag}: {row['status']}, round {fmt_seconds(row['round_s'])}, aggregator peak "
                + ", ".join(_mb(p) for p in row["aggregator_peak_rss_bytes"])
                + f" (target {_mb(row['rss_target_bytes'])})"
            )
    return rows


def _mb(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / MB:.0f} MB"


def large_table(rows: Sequence[dict[str, Any]]) -> str:
    """The large section's rows: phases, memory, disk and bytes sent of each cell."""
    lines = []
    body = []
    for r in rows:
        name = f"{r['clients']} x {fmt_dim(r['dim'])}"
        if r.get("status") != "ok":
            lines.append(f"  {name} [{r['ring']}]: {r.get('status')}: {r.get('reason')}")
            if r.get("status") == "skipped" or "phases" not in r:
                continue
        ph = r["phases"]
        body.append(
            [
                name,
                r["ring"],
                fmt_seconds(ph["start_s"]),
                fmt_seconds(max(r["client_generate_s"])),
                fmt_seconds(max(r["client_submit_s"])),
                fmt_seconds(ph["uploads_s"]),
                fmt_seconds(r["collector_aggregate_s"]),
                fmt_seconds(ph["check_s"]),
                "exact" if r["check"]["exact"] else f"{r['check']['mismatches']} differ",
            ]
        )
    table = format_table(
        "large: clients at once, each in its own process, full shares streamed; the total "
        "streamed into a memory-mapped .npy and checked block by block; times per phase",
        [
            "clients x d",
            "ring",
            "start",
            "generate",
            "submit (slowest)",
            "uploads",
            "collect",
            "check",
            "total",
        ],
        body,
    )
    mem = []
    for r in rows:
        if "phases" not in r:
            continue
        mem.append(
            [
                f"{r['clients']} x {fmt_dim(r['dim'])}",
                r["ring"],
                " / ".join(_mb(p) for p in r["aggregator_idle_rss_bytes"]),
                " / ".join(_mb(p) for p in r["aggregator_peak_rss_bytes"]),
                _mb(r["rss_target_bytes"]),
                "n/a"
                if r["worst_of_target"] is None
                else ("met" if r["worst_of_target"] <= 1.0 else "NOT met"),
                _mb(max(p or 0 for p in r["client_peak_rss_bytes"])),
                _mb(r["collector_peak_rss_bytes"]),
                " / ".join(_mb(p) for p in r["data_dir_peak_bytes"]),
                _mb(r["collector_disk_peak_bytes"]),
                fmt_bytes(r["upload_bytes"]),
                fmt_bytes(r["reveal_bytes_model"]),
            ]
        )
    table += "\n\n" + format_table(
        "large: memory (peak RSS = VmHWM; aggregators 0 / 1 / 2), peak disk under each "
        "aggregator's data directory and of the collector's .npy (its exact ring total, s d "
        "more, is unnamed), bytes sent (uploads measured; reveal m(m-1)·s·d by the protocol)",
        [
            "clients x d",
            "ring",
            "agg idle",
            "agg peak",
            "target",
            "verdict",
            "client peak",
            "collector peak",
            "agg disk",
            "collector disk",
            "uploads",
            "reveal",
        ],
        mem,
    )
    return table + ("\nnot run or failed:\n" + "\n".join(lines) if lines else "")
