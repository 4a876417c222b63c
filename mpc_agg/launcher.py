"""Start every aggregator of a topology on this machine, and stop them all.

docs/design.md, "Processes"; README, "Running aggregators". Used by
``scripts/launch_local.py``, the demo, the benchmark and the integration tests. Each party is
a separate process (``python -m mpc_agg.party --topology T --index i --party-dir D``, or
another party program given as ``party_command``, e.g. a test's fault-injecting one); its
output is prefixed with ``[agg i]``. A template topology (no keys) is provisioned first
(:func:`mpc_agg.provision.provision_local`): throw-away keys, one party directory each. A
party whose data directory (``<data_dir>/aggregator-i``) does not exist yet (or is empty)
is started with ``--new-data-dir`` (logged): a new privacy ledger on a first launch, never
on a later one.

:meth:`LocalFederation.wait_ready` returns once every party proves who it is: it answers
``/healthz`` over HTTPS pinned to its own certificate, with the collector's token, naming
its index, the topology's fingerprint and the process id the launcher started, and its
party links are up. Something else on a party's port fails the launch, naming the port.
Every child is started with :func:`die_with_parent`, so none outlives the process that
started it.
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
from typing import IO, TYPE_CHECKING, TextIO

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.errors import UsageError
from mpc_agg.provision import LocalDeployment, deployment_of, provision_local
from mpc_agg.storage.binding import inspect_data_dir
from mpc_agg.transport.tls import https_client_context

if TYPE_CHECKING:
    from mpc_agg.client import Client
    from mpc_agg.collector import Collector


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


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now (None if it can), as asyncio would bind
    it (SO_REUSEADDR)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class LaunchError(RuntimeError):
    """A party exited early or did not become ready in time."""


PARTY_COMMAND: tuple[str, ...] = (sys.executable, "-u", "-m", "mpc_agg.party")
"""The program that runs one party; the launcher appends ``--topology``, ``--index``,
``--party-dir``, ``--log-level``, ``--stream-above-mb`` if it was given and, for a data
directory that does not exist yet (or is empty), ``--new-data-dir``."""


class LocalFederation:
    """The aggregator processes of the topology at ``config_path``.

    A template (no keys) is provisioned with throw-away keys under its ``data_dir``
    (:func:`mpc_agg.provision.provision_local`); a topology with keys needs
    ``party_dirs``, one per aggregator. :attr:`deployment` then gives the provisioned
    topology, the tokens and ready-made :meth:`client` / :meth:`collector` objects.
    ``party_command`` replaces :data:`PARTY_COMMAND` as the program run for each party (it
    must accept the same options); ``env`` is added to the parties' environment.

    ``cwd`` is the parties' working directory (default: the current one). A relative
    ``data_dir`` of the template resolves against the template's directory, wherever the
    launcher runs; ``data_dir`` replaces the template's (e.g. a throw-away run in a
    temporary directory: keys, journals and ledgers all go there). ``adopt_data_dir``
    passes ``--adopt-data-dir`` to every party whose data directory is not fresh (state of
    an older version, or of a changed template: its ledger carries over, loudly).
    ``stream_above_mb`` passes ``--stream-above-mb`` to every party (the streaming
    threshold, a local setting; e.g. a small one so that tests stream modest vectors).
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
        party_dirs: Sequence[str | Path] | None = None,
        data_dir: str | Path | None = None,
        adopt_data_dir: bool = False,
        stream_above_mb: float | None = None,
    ) -> None:
        self.adopt_data_dir = adopt_data_dir
        self.stream_above_mb = stream_above_mb
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        template = Path(config_path).resolve()
        if party_dirs is not None:
            self.deployment: LocalDeployment = deployment_of(template, party_dirs)
        else:
            self.deployment = provision_local(template, data_dir=data_dir)
        self.config_path = self.deployment.topology_path
        self.topology = self.deployment.topology()
        self.fingerprint = fingerprint(self.topology)
        self.log_level = log_level
        self.output = output if output is not None else sys.stdout
        self.env = dict(env or {})
        self.party_command = tuple(party_command) if party_command else PARTY_COMMAND
        self._collector_tokens: list[str] | None = None
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
        """Spawn one process per aggregator, after checking that their ports are free."""
        for a in self.topology.aggregators:
            for port, what in ((a.http_port, "HTTP API"), (a.mpc_port, "party links")):
                taken = port_taken(a.host, port)
                if taken:
                    raise LaunchError(
                        f"port {a.host}:{port} (aggregator {a.index}'s {what}) is taken: "
                        f"{taken}; is this topology already running?"
                    )
        for a in self.topology.aggregators:
            self.processes.append(self._spawn(a.index))

    def command(self, index: int) -> list[str]:
        """The command line that runs aggregator ``index`` now: with ``--new-data-dir`` if
        its data directory does not exist yet, or holds nothing (e.g. a fresh mount)."""
        command = [
            *self.party_command,
            "--topology",
            str(self.config_path),
            "--index",
            str(index),
            "--party-dir",
            str(self.deployment.party_dirs[index]),
            "--log-level",
            self.log_level,
        ]
        if self.stream_above_mb is not None:
            command += ["--stream-above-mb", repr(float(self.stream_above_mb))]
        directory = self.topology.aggregator_dir(index)
        if inspect_data_dir(directory).fresh:
            self._note(f"aggregator {index}: new data directory {directory} (--new-data-dir)")
            command.append("--new-data-dir")
        elif self.adopt_data_dir:
            self._note(f"aggregator {index}: adopting data directory {directory}")
            command.append("--adopt-data-dir")
        return command

    def _note(self, text: str) -> None:
        """A line of the launcher's own in the parties' output."""
        with self._lock:
            try:
                self.output.write(f"[launcher] {text}\n")
                self.output.flush()
            except ValueError:
                pass

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
        """True once aggregator ``i`` proves it is the process this launcher started, for
        this topology, with its links up; raises :class:`LaunchError` when the port is held
        by something else."""
        address = self.topology.aggregators[i]
        where = f"{address.host}:{address.http_port}"
        headers = {}
        if not self.topology.insecure:
            if self._collector_tokens is None:
                self._collector_tokens = self.deployment.collector_tokens()
            headers["Authorization"] = f"Bearer {self._collector_tokens[i]}"
        request = urllib.request.Request(address.url + "/healthz", headers=headers)
        try:
            with urllib.request.urlopen(
                request, timeout=1.0, context=https_client_context(address)
            ) as resp:
                status = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise LaunchError(
                    f"port {where} (aggregator {i}'s HTTP API) is held by another server: it "
                    f"refuses this federation's token ({exc.code})"
                ) from None
            return False
        except (OSError, urllib.error.URLError, ValueError, UsageError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise LaunchError(
                    f"port {where} (aggregator {i}'s HTTP API) is held by another server: it "
                    "does not present the certificate this topology pins"
                ) from None
            return False
        expected = (i, self.fingerprint, self.processes[i].pid)
        found = (status.get("aggregator"), status.get("fingerprint"), status.get("pid"))
        if found != expected:
            raise LaunchError(
                f"port {where} (aggregator {i}'s HTTP API) is held by another process "
                f"(it answers as aggregator {found[0]}, pid {found[2]}, not pid {expected[2]}): "
                "is this topology already running?"
            )
        return bool(status.get("mpc") == "connected")

    def client(self, client_id: str, **kwargs: object) -> Client:
        """A client of this federation with its tokens (:class:`LocalDeployment`)."""
        return self.deployment.client(client_id, **kwargs)

    def collector(self, **kwargs: object) -> Collector:
        """The collector of this federation with its tokens."""
        return self.deployment.collector(**kwargs)

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
