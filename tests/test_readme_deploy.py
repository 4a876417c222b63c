"""The README's "Deploying across organisations" walkthrough, run as written.

Every ``bash`` block of that section runs in a fresh directory with the ``mpc-agg`` this
interpreter installed, in order; the only changes are the port numbers (mapped to free
ones) and that each ``mpc-agg party`` line of the "start" block becomes a background
process (a user runs each in its own terminal or machine), stopped by its pid at the end.
Each organisation's directory must hold only its own private keys.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mpc_agg.launcher import die_with_parent, free_loopback_ports
from tests.party_dirs import foreign_secrets

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Deploying across organisations"

pytestmark = pytest.mark.processes


def walkthrough_blocks() -> list[str]:
    """The ``bash`` blocks of the README section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_steps() -> None:
    blocks = walkthrough_blocks()
    joined = "\n".join(blocks)
    for command in ("keygen", "assemble", "verify", "token", "party", "open", "submit", "collect"):
        assert f"mpc-agg {command}" in joined, command


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], list[subprocess.Popen]]]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MPC_AGG_TOPOLOGY", None)
    procs: list[subprocess.Popen] = []
    yield tmp_path, env, procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _free_ports(blocks: list[str]) -> dict[str, str]:
    ports = sorted(set(re.findall(r"--(?:mpc|http)-port (\d+)", "\n".join(blocks))))
    return dict(zip(ports, map(str, free_loopback_ports(len(ports))), strict=True))


def test_the_walkthrough_runs_as_written(workdir) -> None:
    tmp, env, procs = workdir
    blocks = walkthrough_blocks()
    ports = _free_ports(blocks)
    assert len(ports) == 6
    for block in blocks:
        for old, new in ports.items():
            block = re.sub(rf"\b{old}\b", new, block)
        if "mpc-agg party" in block:
            for line in block.splitlines():
                command = line.split("#", 1)[0].strip()
                if not command:
                    continue
                argv = shlex.split(command)
                assert argv[:2] == ["mpc-agg", "party"], line
                log = open(tmp / f"party-{len(procs)}.log", "wb")  # noqa: SIM115
                procs.append(
                    subprocess.Popen(
                        argv,
                        cwd=tmp,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                )
            continue
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp.glob("party-*.log")))
        assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}\n{logs}"
    assert len(procs) == 3 and all(p.poll() is None for p in procs)

    # What the walkthrough produced: a total of 2 clients with noise, verified.
    total = np.loadtxt(tmp / "total.csv")
    assert total.shape == (3,) and np.all(np.isfinite(total))
    assert (tmp / "r1.npz").exists()
    # Each organisation's directory holds only its own private key material.
    assert foreign_secrets([tmp / f"org{i}" for i in range(3)]) == []
