"""Importing the core (and the package) has no side effects and leaves MPyC unloaded.

docs/design.md, "Processes": only the MPyC glue module imports ``mpyc``, after it has set
``sys.argv``. A module that cannot be imported at all fails the test. Each check sees only what
its own import statement loads, so modules imported by other tests (or checks) do not count.

Every ``import mpc_agg.x`` first runs the package's ``__init__``, in a fresh interpreter too.
So one interpreter imports the package root, then forks one child per check, which runs the
check's import statement from that state: exactly the state a fresh interpreter would be in
at that point, reached once instead of once per check (and once per session: the results are
shared with tests/test_dp_planning.py, whose lazy-import check is one of the statements).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile

import pytest

SERVER = r"""
import json, os, sys, traceback

CHECKS = {checks}


def check(modules):
    out = {"ok": False, "mpyc": None, "error": None}
    try:
        exec("import " + modules, {})
    except Exception:
        out["error"] = traceback.format_exc()
    else:
        out["ok"] = True
        out["mpyc"] = sorted(m for m in sys.modules if m == "mpyc" or m.startswith("mpyc."))
        out["argv"] = sys.argv
        out["scipy_or_dp_accounting"] = sorted(
            m for m in ("scipy", "dp_accounting") if m in sys.modules
        )
    return out


try:
    import mpc_agg  # what every check imports first; a failure repeats in each check
except Exception:
    pass
children = []
for modules in CHECKS:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the check, from the state after the package's __init__
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(json.dumps(check(modules)))
        finally:
            os._exit(0)
    os.close(write_end)
    children.append((modules, pid, read_end))
results = {}
for modules, pid, read_end in children:
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[modules] = json.loads(data) if data else {"ok": False, "error": f"status {status}"}
print(json.dumps(results))
"""

CORE_MODULES = "mpc_agg.core.field, mpc_agg.core.sharing, mpc_agg.core.codec, mpc_agg.core.rounds"


CHECKS = [
    CORE_MODULES,
    "mpc_agg.core.xof, mpc_agg.core.encoding, mpc_agg.core.accumulator",
    "mpc_agg.core.protocol",
    "mpc_agg",
    "mpc_agg.aggregator",
    "mpc_agg.config.fingerprint, mpc_agg.core.statement",
    "mpc_agg.identity, mpc_agg.provision, mpc_agg.transport.tls, mpc_agg.transport.auth",
    "mpc_agg.client, mpc_agg.collector, mpc_agg.transport.http_server",
]
BROKEN = "mpc_agg.core.no_such_module"
DP_LAZY = (  # tests/test_dp_planning.py: dp_accounting and scipy are imported only when used
    "mpc_agg.dp.planning, mpc_agg.dp.binomial, mpc_agg.dp.accountant, "
    "mpc_agg.dp.calibration, mpc_agg.config"
)


@functools.cache
def import_results() -> dict[str, dict]:
    """Every statement's result (CHECKS, BROKEN, DP_LAZY), by statement; run once."""
    # Not the repo root as cwd, so '' on sys.path cannot shadow the installed package.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, "-c", SERVER.replace("{checks}", repr([*CHECKS, BROKEN, DP_LAZY]))],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
        )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def results() -> dict[str, dict]:
    return import_results()


@pytest.mark.parametrize("modules", CHECKS)
def test_import_leaves_mpyc_out(modules: str, results: dict[str, dict]) -> None:
    out = results[modules]
    assert out["ok"], f"import {modules} failed:\n{out['error']}"  # a broken import fails
    assert out["mpyc"] == [], f"import {modules} loaded {out['mpyc']}"
    assert out["argv"] == ["-c"]  # nothing rewrote sys.argv at import time


def test_a_broken_import_fails_instead_of_skipping(results: dict[str, dict]) -> None:
    out = results[BROKEN]
    assert not out["ok"] and "ModuleNotFoundError" in out["error"]
