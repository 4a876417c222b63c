"""Importing the core (and the package) has no side effects and leaves MPyC unloaded.

docs/design.md, "Processes": only the MPyC glue module imports ``mpyc``, after it has set
``sys.argv``. A module that cannot be imported at all fails the test. Each check runs in a fresh
interpreter, so modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys, traceback
out = {"ok": False, "mpyc": None, "error": None}
try:
    import {modules}
except Exception:
    out["error"] = traceback.format_exc()
else:
    out["ok"] = True
    out["mpyc"] = sorted(m for m in sys.modules if m == "mpyc" or m.startswith("mpyc."))
    out["argv"] = sys.argv
print(json.dumps(out))
"""

CORE_MODULES = "mpc_agg.core.field, mpc_agg.core.sharing, mpc_agg.core.codec, mpc_agg.core.rounds"


def run_child(modules: str, cwd: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.replace("{modules}", modules)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,  # not the repo root, so '' on sys.path cannot shadow the installed package
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "modules",
    [
        CORE_MODULES,
        "mpc_agg.core.xof, mpc_agg.core.encoding, mpc_agg.core.accumulator",
        "mpc_agg.core.protocol",
        "mpc_agg",
        "mpc_agg.aggregator",
        "mpc_agg.config.fingerprint, mpc_agg.core.statement",
        "mpc_agg.identity, mpc_agg.provision, mpc_agg.transport.tls, mpc_agg.transport.auth",
        "mpc_agg.client, mpc_agg.collector, mpc_agg.transport.http_server",
    ],
)
def test_import_leaves_mpyc_out(modules: str, tmp_path: Path) -> None:
    out = run_child(modules, tmp_path)
    assert out["ok"], f"import {modules} failed:\n{out['error']}"  # a broken import fails
    assert out["mpyc"] == [], f"import {modules} loaded {out['mpyc']}"
    assert out["argv"] == ["-c"]  # nothing rewrote sys.argv at import time


def test_a_broken_import_fails_instead_of_skipping(tmp_path: Path) -> None:
    out = run_child("mpc_agg.core.no_such_module", tmp_path)
    assert not out["ok"] and "ModuleNotFoundError" in out["error"]
