"""Importing the core (and the package) has no side effects and leaves MPyC unloaded.

STYLE.md habit 3: only the MPyC glue module imports ``mpyc``, after it has set ``sys.argv``.
Each check runs in a fresh interpreter, so modules imported by other tests do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, os, sys, traceback
out = {"ok": False, "mpyc": None, "error": None, "from_init": False}
try:
    import {modules}
except ImportError as exc:
    out["error"] = repr(exc)
    frames = traceback.extract_tb(exc.__traceback__)
    init = os.path.join("mpc_agg", "__init__.py")
    # Failing inside mpc_agg/__init__.py on a module that is not part of the core.
    out["from_init"] = any(f.filename.endswith(init) for f in frames) and not (
        (exc.name or "").startswith("mpc_agg.core")
    )
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
    [CORE_MODULES, "mpc_agg.core.xof, mpc_agg.core.encoding, mpc_agg.core.accumulator", "mpc_agg"],
)
def test_import_leaves_mpyc_out(modules: str, tmp_path: Path) -> None:
    out = run_child(modules, tmp_path)
    if not out["ok"]:
        if out["from_init"]:
            pytest.skip(f"mpc_agg/__init__.py is incomplete: {out['error']}")
        pytest.fail(f"import {modules} failed: {out['error']}")
    assert out["mpyc"] == [], f"import {modules} loaded {out['mpyc']}"
    assert out["argv"] == ["-c"]  # nothing rewrote sys.argv at import time
