"""Start every aggregator of a topology on this machine, and stop them all.

docs/design.md, "Processes"; README, "Running aggregators". Used by
``scripts/launch_local.py``, the demo, the benchmark and the integration tests. Each party is
a separate process (``python -m mpc_agg.party --config C --index i``, or another party
program given as ``party_command``, e.g. a test's fault-injecting one); its output is
prefixed with ``[agg i]``. :meth:`LocalFederation.wait_ready` returns once every party's HTTP
API answers and its MPyC links are connected. Every child is started with
:func:`die_with_parent`, so none outlives the process that started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TextIO

from mpc_agg.config.schema import Topology


def die_with_parent() -> None:
    """In a child, before exec (``subprocess.Popen(preexec_fn=die_with_parent)``): ask Linux
    to SIGTERM it when its parent dies, even by SIGKILL, so no child outlives the process
    that started it. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago (for local
    topologies in tests and benchmarks; another process may still take one)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LaunchError(RuntimeError):
    """A party exited early or did not become ready in time."""


PARTY_COMMAND: tuple[str, ...] = (sys.executable, "-u", "-m", "mpc_agg.party")
"""The program that runs one party; the launcher appends ``--config``, ``--index`` and
``--log-level``."""


class LocalFederation:
    """The aggregator processes of ``topology`` (read from ``config_path``).

    ``party_command`` replaces :data:`PARTY_COMMAND` as the program run for each party (it
    must accept the same ``--config``/``--index``/``--log-level`` options); ``env`` is added
    to the parties' environment.
    """

    def __init__(
        self,
        config_path: str | Path,
        *,
        log_level: str = "info",
        output: TextIO | None = None,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        party_command: Sequence[str] | None = None,
    ) -> None:
        self.config_path = Path(config_path).resolve()
        self.topology = Topology.load(self.config_path)
        self.log_level = log_level
        self.output = output if output is not None else sys.stdout
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.env = dict(env or {})
        self.party_command = tuple(party_command) if party_command else PARTY_COMMAND
        self._tls_context: ssl.SSLContext | None = None
        self.processes: list[subprocess.Popen[str]] = []
        self._tails: list[deque[str]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Spawn one process per aggregator."""
        for a in self.topology.aggregators:
            self.processes.append(self._spawn(a.index))

    def command(self, index: int) -> list[str]:
        """The command line that runs aggregator ``index``."""
        return [
            *self.party_command,
            "--config",
            str(self.config_path),
            "--index",
            str(index),
            "--log-level",
            self.log_level,
        ]

    def _spawn(self, index: int) -> subprocess.Popen[str]:
        env = {**os.environ, **self.env}
        proc = subprocess.Popen(
            self.command(index),
            preexec_fn=die_with_parent,
            cwd=self.cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        tail: deque[str] = deque(maxlen=30)
        if index < len(self._tails):
            self._tails[index] = tail
        else:
            self._tails.append(tail)
        t = threading.Thread(
            target=self._pump, args=(proc.stdout, f"[agg {index}] ", tail), daemon=True
        )
        t.start()
        self._threads.append(t)
        return proc

    def restart(self, index: int) -> None:
        """Start aggregator ``index`` again with the same command (after it died)."""
        if self.processes[index].poll() is None:
            raise RuntimeError(f"aggregator {index} is still running")
        self.processes[index] = self._spawn(index)

    def _pump(self, stream: IO[str] | None, prefix: str, tail: deque[str]) -> None:
        if stream is None:
            return
        for line in stream:
            tail.append(line.rstrip("\n"))
            with self._lock:
                try:
                    self.output.write(prefix + line)
                    self.output.flush()
                except ValueError:  # output closed while shutting down
                    return

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every party accepts uploads and is connected to the others
        (at most ``timeout_s``, default the topology's ``deadlines.startup_s``)."""
        if timeout_s is None:
            timeout_s = self.topology.deadlines.startup_s
        deadline = time.monotonic() + timeout_s
        pending = set(range(self.topology.m))
        while pending:
            for i in sorted(pending):
                proc = self.processes[i]
                if proc.poll() is not None:
                    time.sleep(0.2)  # let the pump thread catch the last lines
                    last = "\n".join(self._tails[i]) or "(no output)"
                    raise LaunchError(
                        f"aggregator {i} exited with code {proc.returncode} before it was "
                        f"ready; its last output:\n{last}"
                    )
                if self._is_ready(i):
                    pending.discard(i)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"aggregators {sorted(pending)} not ready after {timeout_s} s "
                    "(HTTP API not answering or MPyC links not connected)"
                )
            time.sleep(0.1)

    def _is_ready(self, i: int) -> bool:
        url = self.topology.aggregators[i].url + "/healthz"
        context = None
        if self.topology.tls is not None:
            if self._tls_context is None:  # one context for every readiness poll
                from mpc_agg.transport.tls import client_context

                self._tls_context = client_context(self.topology.tls.dir)
            context = self._tls_context
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                return bool(json.loads(resp.read()).get("mpc") == "connected")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every party, wait, then SIGKILL any that remain. Idempotent."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._threads:
            t.join(timeout=2.0)

    @property
    def pids(self) -> list[int]:
        """Process ids of the parties, in index order."""
        return [p.pid for p in self.processes]


def describe(topology: Topology) -> str:
    """One line naming each aggregator's URL."""
    urls = ", ".join(f"{a.index}={a.url}" for a in topology.aggregators)
    return f"{topology.m} aggregators of {topology.name} ({urls})"
