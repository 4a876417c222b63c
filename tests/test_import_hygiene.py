"""Importing the core (and the package) has no side effects and leaves MPyC unloaded.

docs/design.md, "Processes": only the MPyC glue module imports ``mpyc``, after it has set
``sys.argv``. A module that cannot be imported at all fails the test. Each check runs in a fresh
interpreter, so modules imported by other tests do not count; the interpreters are started
together (one module-scoped fixture), so they run in parallel.
"""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.fixture(scope="module")
def children(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Every check's child (one fresh interpreter per import statement), started at once."""
    cwd = tmp_path_factory.mktemp("imports")  # not the repo root, so '' on sys.path cannot
    # shadow the installed package
    procs = {
        modules: subprocess.Popen(
            [sys.executable, "-c", CHILD.replace("{modules}", modules)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
        for modules in [*CHECKS, BROKEN]
    }
    done = {}
    try:
        for modules, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=60)
            done[modules] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def child_result(children: dict[str, subprocess.CompletedProcess], modules: str) -> dict:
    proc = children[modules]
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("modules", CHECKS)
def test_import_leaves_mpyc_out(modules: str, children) -> None:
    out = child_result(children, modules)
    assert out["ok"], f"import {modules} failed:\n{out['error']}"  # a broken import fails
    assert out["mpyc"] == [], f"import {modules} loaded {out['mpyc']}"
    assert out["argv"] == ["-c"]  # nothing rewrote sys.argv at import time


def test_a_broken_import_fails_instead_of_skipping(children) -> None:
    out = child_result(children, BROKEN)
    assert not out["ok"] and "ModuleNotFoundError" in out["error"]
