"""scripts/noise_bench.py: one small run of the script as users run it, checked through its
JSON (one row; the sampler and both baselines measured, in positive ns per sample)."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_one_small_run_writes_one_row_with_every_figure(tmp_path):
    out = tmp_path / "out.json"
    subprocess.run(
        [
            sys.executable,
            "scripts/noise_bench.py",
            "--dims",
            "1e3",
            "--sigma2",
            "1024",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=120,
        capture_output=True,
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["d"], row["sigma2"]) == (1000, 1024)
    for figure in (
        "sampler_median_ns",
        "sampler_min_ns",
        "words_per_sample",
        "skellam_median_ns",
        "keystream_median_ns",
        "ratio_sampler_to_skellam",
    ):
        assert row[figure] > 0, (figure, row)
