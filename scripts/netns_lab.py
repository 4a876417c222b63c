"""A wide-area network on one Linux machine: each host in its own network namespace.

Used by ``tests/test_netns.py`` and ``scripts/wan_bench.py`` (README, "Deploying across
organisations"). Every host (three aggregators, one namespace for clients and the
collector) gets its own namespace and its own address in ``10.77.0.0/24``; hosts reach each
other only over the lab's links, each host's outgoing traffic delayed by ``delay_ms`` (so a
round trip between two hosts takes ``2 * delay_ms``) and limited to ``rate_mbit``.

Two link models, chosen by :func:`link_model` (same addresses, same commands on top):

``netem``
    veth pairs into a bridge in a "switch" namespace; each host's egress carries
    ``tc netem delay D rate R``.
``tap``
    for kernels built without ``sch_netem`` (e.g. this project's Firecracker VMs): a TAP
    device in each host namespace, all held by one switch process (:func:`run_switch`,
    ``python -m scripts.netns_lab switch``) that forwards Ethernet frames between them
    after ``delay_ms`` (a learning switch, flooding unknown destinations); each host's
    egress is limited by ``tc tbf``. The TAP devices vanish with the switch process.

The :class:`Federation` on top does what three organisations do: ``mpc-agg keygen`` in
three separate party directories, ``assemble``, ``verify --card``, ``token``, then
``mpc-agg party`` in each party's namespace from its own directory. Everything is torn down
by :meth:`NetLab.close` / :meth:`Federation.stop`: processes stopped by pid, namespaces
deleted. Needs root and iproute2; :func:`unavailable` says why not otherwise.

Inside the client namespace: ``python -m scripts.netns_lab ready|round ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
PREFIX_LEN = 24
IFACE = "lab0"
MPC_PORT = 11400
HTTP_PORT = 8800
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000


# -- availability ------------------------------------------------------------------------


def _quiet(argv: Sequence[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def unavailable() -> str | None:
    """Why the lab cannot run here (None if it can): not root, iproute2 missing, network
    namespaces refused, or neither netem nor TAP devices available."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 missing: {', '.join(missing)} not on PATH"
    probe = f"mpcprobe-{os.getpid()}-{secrets.token_hex(2)}"
    made = _quiet(["ip", "netns", "add", probe])
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    try:
        if _netem_in(probe) or os.path.exists("/dev/net/tun"):
            return None
        return "the kernel has no sch_netem and there is no /dev/net/tun"
    finally:
        _quiet(["ip", "netns", "del", probe])


def _netem_in(ns: str) -> bool:
    """Whether ``tc netem`` works (probed on a dummy veth in namespace ``ns``)."""
    if _quiet(
        ["ip", "-n", ns, "link", "add", "probe0", "type", "veth", "peer", "probe1"]
    ).returncode:
        return False
    try:
        added = _quiet(
            ["tc", "-n", ns, "qdisc", "add", "dev", "probe0", "root", "netem", "delay", "1ms"]
        )
        return added.returncode == 0
    finally:
        _quiet(["ip", "-n", ns, "link", "del", "probe0"])


def link_model() -> str:
    """``netem`` when the kernel has it, else ``tap`` (see the module docstring)."""
    probe = f"mpcprobe-{os.getpid()}-{secrets.token_hex(2)}"
    if _quiet(["ip", "netns", "add", probe]).returncode:
        return "tap"
    try:
        return "netem" if _netem_in(probe) else "tap"
    finally:
        _quiet(["ip", "netns", "del", probe])


# -- the lab ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One host of the lab: its label, namespace and address."""

    label: str
    ns: str
    address: str


class NetLab:
    """Hosts ``labels`` in their own namespaces, linked with ``delay_ms`` one way and
    ``rate_mbit`` per host uplink. Use as a context manager; :meth:`close` always cleans up."""

    def __init__(
        self,
        labels: Sequence[str],
        *,
        delay_ms: float = 0.0,
        rate_mbit: float = 100.0,
        model: str = "auto",
        prefix: str | None = None,
    ) -> None:
        if model not in ("auto", "netem", "tap"):
            raise ValueError(f"model must be auto, netem or tap, got {model!r}")
        self.delay_ms = delay_ms
        self.rate_mbit = rate_mbit
        self.model = link_model() if model == "auto" else model
        self.prefix = prefix or f"mpcl{os.getpid()}x{secrets.token_hex(2)}"
        self.hosts = {
            label: Host(label, f"{self.prefix}-{label}", f"{SUBNET}.{10 + k}")
            for k, label in enumerate(labels)
        }
        self.switch_ns = f"{self.prefix}-switch"
        self._made: list[str] = []
        self._switch: subprocess.Popen[str] | None = None

    def __enter__(self) -> NetLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *argv: str) -> None:
        done = _quiet(argv)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")

    def start(self) -> None:
        """Make the namespaces and links."""
        for host in self.hosts.values():
            self._ip("ip", "netns", "add", host.ns)
            self._made.append(host.ns)
            self._ip("ip", "-n", host.ns, "link", "set", "lo", "up")
        if self.model == "netem":
            self._start_bridge()
        else:
            self._start_tap_switch()
        for host in self.hosts.values():
            self._ip(
                "ip", "-n", host.ns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", IFACE
            )
            self._ip("ip", "-n", host.ns, "link", "set", IFACE, "up")
            self._shape(host)

    def _start_bridge(self) -> None:
        self._ip("ip", "netns", "add", self.switch_ns)
        self._made.append(self.switch_ns)
        self._ip("ip", "-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        self._ip("ip", "-n", self.switch_ns, "link", "set", "br0", "up")
        for k, host in enumerate(self.hosts.values()):
            port = f"port{k}"
            self._ip(
                "ip", "-n", host.ns, "link", "add", IFACE, "type", "veth",
                "peer", "name", port, "netns", self.switch_ns,
            )  # fmt: skip
            self._ip("ip", "-n", self.switch_ns, "link", "set", port, "master", "br0", "up")

    def _start_tap_switch(self) -> None:
        argv = [sys.executable, "-m", "scripts.netns_lab", "switch", "--delay-ms"]
        argv += [str(self.delay_ms), *(h.ns for h in self.hosts.values())]
        self._switch = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self._switch.stdout is not None
        line = self._switch.stdout.readline()  # the switch prints "ready" once TAPs exist
        if line.strip() != "ready":
            self._switch.wait(timeout=5)
            err = self._switch.stderr.read() if self._switch.stderr else ""
            raise RuntimeError(f"lab switch failed to start: {line.strip()} {err.strip()}")

    def _shape(self, host: Host) -> None:
        rate = f"{self.rate_mbit:g}mbit"
        if self.model == "netem":
            qdisc = ["netem", "delay", f"{self.delay_ms:g}ms", "rate", rate, "limit", "100000"]
        else:
            qdisc = ["tbf", "rate", rate, "burst", "256kb", "latency", "200ms"]
        self._ip("tc", "-n", host.ns, "qdisc", "add", "dev", IFACE, "root", *qdisc)

    def close(self) -> None:
        """Stop the switch and delete every namespace this lab made (idempotent)."""
        if self._switch is not None:
            _stop(self._switch, timeout_s=5.0)
            self._switch = None
        for ns in reversed(self._made):
            _quiet(["ip", "netns", "del", ns])
        self._made.clear()

    def argv(self, label: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run in host ``label``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.hosts[label].ns, *argv]

    def run(
        self, label: str, argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in host ``label``'s namespace; raise with its output if it fails."""
        done = subprocess.run(
            self.argv(label, argv), cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} in {label} exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done


def _stop(proc: subprocess.Popen[Any], timeout_s: float, *, signalled: bool = False) -> None:
    """SIGTERM ``proc`` (by its pid; once: ``signalled`` if the caller did), then SIGKILL it
    if it has not exited in time."""
    if proc.poll() is None:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


# -- the TAP switch (runs as its own process) ------------------------------------------------


def _open_tap(ns: str, libc: ctypes.CDLL, home: int) -> int:
    """A TAP device named :data:`IFACE` in namespace ``ns``; returns its file descriptor.
    The device lives in the namespace the opener was in when it opened ``/dev/net/tun``."""
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", IFACE.encode(), _IFF_TAP | _IFF_NO_PI))
    finally:
        os.close(target)
        if libc.setns(home, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back home")
    return fd


def run_switch(namespaces: Sequence[str], delay_s: float) -> None:
    """Forward Ethernet frames between a TAP in each of ``namespaces``, each after
    ``delay_s``, until SIGTERM. A learning switch: a frame goes to the port its destination
    MAC was last seen on, else to every other port."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    ports = [_open_tap(ns, libc, home) for ns in namespaces]
    where: dict[bytes, int] = {}
    pending: list[tuple[float, int, int, bytes]] = []  # (due, seq, fd, frame)
    seq = 0
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    selector = selectors.DefaultSelector()
    for fd in ports:
        selector.register(fd, selectors.EVENT_READ)
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, frame = heapq.heappop(pending)
            with contextlib.suppress(OSError):  # a full TAP queue drops, as a link would
                os.write(out, frame)
        timeout = max(0.0, pending[0][0] - now) if pending else 0.5
        for key, _ in selector.select(timeout):
            fd = int(key.fd)
            for _ in range(64):  # drain a burst before looking at the clock again
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                where[frame[6:12]] = fd
                known = where.get(frame[0:6])
                targets = [known] if known is not None and known != fd else ports
                targets = [p for p in targets if p != fd]
                due = time.monotonic() + delay_s
                for target in targets:
                    if delay_s <= 0:
                        with contextlib.suppress(OSError):
                            os.write(target, frame)
                    else:
                        seq += 1
                        heapq.heappush(pending, (due, seq, target, frame))
    for fd in ports:
        os.close(fd)


# -- a federation of three organisations in the lab ------------------------------------------


def mpc_agg_argv() -> list[str]:
    """How to run ``mpc-agg``: the console script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).parent / "mpc-agg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mpc_agg"]


def run_cli(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 60.0) -> str:
    """Run ``mpc-agg argv`` here (root namespace: offline steps); its standard output."""
    done = subprocess.run(
        [*mpc_agg_argv(), *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"mpc-agg {' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def template_from(config: Path, name: str) -> dict[str, Any]:
    """The topology template of ``config`` without its aggregators (the cards supply them),
    renamed ``name``, with its data directory relative to each party directory."""
    doc = yaml.safe_load(config.read_text())
    doc.pop("aggregators", None)
    doc["name"] = name
    doc["data_dir"] = "data"
    return dict(doc)


@dataclass
class Federation:
    """Aggregators ``agg0..agg{m-1}`` of ``lab`` and a ``clients`` host: keys made per party
    with ``mpc-agg keygen``, the topology assembled, grants issued, parties started in their
    namespaces from their own directories. ``root`` holds ``party-i/`` (one organisation's
    directory each: its keys, its copy of the topology, its data), ``shared/`` (the
    template, cards and topology: public) and ``grants/`` (the collector's and each
    client's token grants, one per aggregator)."""

    lab: NetLab
    root: Path
    template: dict[str, Any]
    m: int = 3
    clients: Sequence[str] = ()
    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    logs: list[IO[str]] = field(default_factory=list)
    exit_statuses: list[int | None] = field(default_factory=list)

    def party_dir(self, i: int) -> Path:
        return self.root / f"party-{i}"

    @property
    def topology(self) -> Path:
        return self.root / "shared" / "topology.yaml"

    @property
    def collector_grants(self) -> Path:
        return self.root / "grants" / "collector"

    def client_grants(self, client: str) -> Path:
        return self.root / "grants" / client

    def provision(self) -> str:
        """keygen (each party in its own directory) -> cards -> assemble -> verify --card ->
        token grants for the clients and the collector; returns the fingerprint. The
        organisations' own steps run concurrently, as they would."""
        from concurrent.futures import ThreadPoolExecutor

        shared = self.root / "shared"
        shared.mkdir(parents=True, exist_ok=True)

        def keygen(i: int) -> None:
            host = self.lab.hosts[f"agg{i}"].address
            run_cli(
                ["keygen", "--party-dir", str(self.party_dir(i)), "--index", str(i),
                 "--host", host, "--mpc-port", str(MPC_PORT), "--http-port", str(HTTP_PORT)],
            )  # fmt: skip
            shutil.copy(self.party_dir(i) / "card.yaml", shared / f"card-{i}.yaml")  # "send"

        def enrol(i: int) -> None:
            mine = self.party_dir(i) / "topology.yaml"  # each party keeps its own copy
            shutil.copy(self.topology, mine)
            run_cli(["verify", "-t", str(mine), "--card", str(self.party_dir(i) / "card.yaml")])
            outbox = self.root / f"outbox-{i}"
            if self.clients:
                run_cli(["token", "--party-dir", str(self.party_dir(i)), "--client",
                         *self.clients, "-o", str(outbox)])  # fmt: skip
            run_cli(["token", "--party-dir", str(self.party_dir(i)), "--collector", "-o",
                     str(outbox)])  # fmt: skip

        with ThreadPoolExecutor(self.m) as pool:
            list(pool.map(keygen, range(self.m)))
        template = shared / "template.yaml"
        template.write_text(yaml.safe_dump(self.template, sort_keys=False))
        cards = [str(shared / f"card-{i}.yaml") for i in range(self.m)]
        out = run_cli(["assemble", "--template", str(template), *cards, "-o", str(self.topology)])
        fingerprint = out.split("fingerprint", 1)[1].split()[0]
        with ThreadPoolExecutor(self.m) as pool:
            list(pool.map(enrol, range(self.m)))
        for i in range(self.m):  # hand each grant to its holder
            outbox = self.root / f"outbox-{i}"
            for who in [*self.clients, "collector"]:
                inbox = self.root / "grants" / who
                inbox.mkdir(parents=True, exist_ok=True)
                (outbox / f"{who}-{i}.token").rename(inbox / f"{who}-{i}.token")
            outbox.rmdir()
        return fingerprint

    def party_argv(self, i: int) -> list[str]:
        """The command that runs party ``i``, from its own directory (as in deploy/)."""
        return [*mpc_agg_argv(), *party_command(self.party_dir(i))]

    def start(self) -> None:
        """Start every party in its namespace; logs go to ``party-i.log`` beside the dirs."""
        for i in range(self.m):
            log = open(self.root / f"party-{i}.log", "w")  # noqa: SIM115 - closed in stop()
            self.logs.append(log)
            proc = subprocess.Popen(
                self.lab.argv(f"agg{i}", self.party_argv(i)),
                cwd=self.party_dir(i),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.processes.append(proc)

    def in_clients(self, argv: Sequence[str], *, timeout: float = 120.0) -> str:
        """Run ``argv`` in the clients' namespace; its standard output."""
        return self.lab.run("clients", argv, cwd=ROOT, timeout=timeout).stdout

    def in_clients_concurrently(
        self, commands: Sequence[Sequence[str]], *, timeout: float = 120.0
    ) -> list[str]:
        """Run ``commands`` at once in the clients' namespace (independent clients); their
        standard outputs."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda argv: self.in_clients(argv, timeout=timeout), commands))

    def wait_ready(self, timeout_s: float = 40.0) -> None:
        """Wait (bounded) until every party answers ``/healthz`` from the clients' host with
        its links up; raise with the parties' log tails if one exits or time runs out."""
        poll = subprocess.Popen(
            self.lab.argv(
                "clients",
                [sys.executable, "-m", "scripts.netns_lab", "ready", "-t", str(self.topology),
                 "--tokens", str(self.collector_grants), "--timeout", str(timeout_s)],
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s + 15
        try:
            while poll.poll() is None:
                dead = [i for i, p in enumerate(self.processes) if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    why = f"parties {dead} exited" if dead else "not ready in time"
                    raise RuntimeError(f"{why}\n{self.log_tails()}")
                time.sleep(0.1)
            if poll.returncode != 0:
                out = poll.stdout.read() if poll.stdout else ""
                raise RuntimeError(f"{out[-1500:]}\n{self.log_tails()}")
        finally:
            _stop(poll, timeout_s=5.0)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for i in range(self.m):
            path = self.root / f"party-{i}.log"
            tail = path.read_text().splitlines()[-lines:] if path.exists() else []
            out.append(f"--- party {i}:\n" + "\n".join(tail))
        return "\n".join(out)

    def stop(self) -> list[int | None]:
        """SIGTERM every party by pid (SIGKILL after 15 s); their exit statuses."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:  # a second SIGTERM would kill a party mid-shutdown
            _stop(proc, timeout_s=15.0, signalled=True)
        for log in self.logs:
            log.close()
        statuses = [p.returncode for p in self.processes]
        self.exit_statuses += statuses
        self.processes.clear()
        self.logs.clear()
        return statuses


def party_command(party_dir: Path | str, *, first_start: bool = True) -> list[str]:
    """``party ...``: the arguments of ``mpc-agg`` that start the party of ``party_dir`` from
    its own copy of the topology (its index from its card) -- the command deploy/ runs.
    ``first_start`` adds ``--new-data-dir`` (an empty data directory is allowed only then)."""
    d = Path(party_dir)
    argv = ["party", "--topology", str(d / "topology.yaml"), "--party-dir", str(d)]
    return [*argv, "--new-data-dir"] if first_start else argv


# -- commands run inside the clients' namespace ----------------------------------------------


def _tokens(topology: Any, path: str, role: str) -> list[str]:
    from mpc_agg.credentials import read_grants, tokens_for

    return tokens_for(topology, read_grants([path]), role)


def wait_until_connected(topology_path: str, grants: str, timeout_s: float) -> None:
    """Poll every party's ``/healthz`` (pinned HTTPS, collector token) until all report
    their party links connected; raise TimeoutError naming the ones that are not."""
    import urllib.request

    from mpc_agg import Topology
    from mpc_agg.transport.tls import https_client_context

    topology = Topology.load(topology_path)
    tokens = _tokens(topology, grants, "collector")
    deadline = time.monotonic() + timeout_s
    pending = set(range(topology.m))
    while pending:
        for i in sorted(pending):
            address = topology.aggregators[i]
            request = urllib.request.Request(
                address.url + "/healthz", headers={"Authorization": f"Bearer {tokens[i]}"}
            )
            try:
                ctx = https_client_context(address)
                with urllib.request.urlopen(request, timeout=2.0, context=ctx) as resp:
                    if json.loads(resp.read()).get("mpc") == "connected":
                        pending.discard(i)
            except OSError:
                pass
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"aggregators {sorted(pending)} not connected in {timeout_s} s")
        if pending:
            time.sleep(0.2)


def timed_round(
    topology_path: str,
    collector_grants: str,
    client_grants: Sequence[str],
    round_id: str,
    dim: int,
    seed: int,
) -> dict[str, Any]:
    """One round from this host: open, every client submits (concurrently), collect.
    Returns the phase times (s) and the largest error of the total against the exact sum."""
    import asyncio

    import numpy as np

    from mpc_agg import Client, Collector, Topology

    topology = Topology.load(topology_path)
    collector = Collector(topology, _tokens(topology, collector_grants, "collector"))
    clients = []
    for path in client_grants:
        from mpc_agg.credentials import read_grants, tokens_for

        grants = read_grants([path])
        cid = grants[0][1].client
        assert cid is not None
        clients.append(Client(topology, cid, tokens_for(topology, grants, "client")))
    rng = np.random.default_rng(seed)
    vectors = [rng.uniform(-1, 1, dim) / np.sqrt(dim) for _ in clients]  # inside any L2 clip

    async def submit_all() -> None:
        await asyncio.gather(
            *(c.submit_async(round_id, v) for c, v in zip(clients, vectors, strict=True))
        )

    t0 = time.perf_counter()
    collector.open_round(round_id, dim)
    t1 = time.perf_counter()
    asyncio.run(submit_all())
    t2 = time.perf_counter()
    result = collector.aggregate(round_id)
    t3 = time.perf_counter()
    error = float(np.max(np.abs(result.total - np.sum(vectors, axis=0))))
    return {
        "open_s": t1 - t0,
        "submit_s": t2 - t1,
        "collect_s": t3 - t2,
        "round_s": t3 - t0,
        "num_clients": result.num_clients,
        "max_error": error,
        "noise_stddev": result.noise_stddev,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.netns_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("switch", help="run the TAP switch (the lab starts it)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("namespaces", nargs="+")
    p = sub.add_parser("ready", help="wait until every party's links are up")
    p.add_argument("-t", "--topology", required=True)
    p.add_argument("--tokens", required=True, help="the collector's grants (a directory)")
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("round", help="time one round; prints JSON")
    p.add_argument("-t", "--topology", required=True)
    p.add_argument("--collector-tokens", required=True)
    p.add_argument("--client-tokens", nargs="+", required=True, help="one directory per client")
    p.add_argument("--round", required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "switch":
        run_switch(args.namespaces, args.delay_ms / 1000.0)
    elif args.command == "ready":
        wait_until_connected(args.topology, args.tokens, args.timeout)
    else:
        timings = timed_round(
            args.topology, args.collector_tokens, args.client_tokens, args.round, args.dim,
            args.seed,
        )  # fmt: skip
        print(json.dumps(timings))
    return 0


@contextlib.contextmanager
def federation(
    root: Path,
    config: Path,
    *,
    clients: Sequence[str],
    delay_ms: float,
    rate_mbit: float = 100.0,
    name: str = "wan-lab",
    ready_timeout_s: float = 40.0,
) -> Iterator[Federation]:
    """A lab of ``agg0..agg2`` and ``clients`` and a running federation on it (template
    ``config``); everything stopped and deleted on exit."""
    with NetLab(["agg0", "agg1", "agg2", "clients"], delay_ms=delay_ms, rate_mbit=rate_mbit) as lab:
        fed = Federation(lab, root, template_from(config, name), clients=list(clients))
        try:
            fed.provision()
            fed.start()
            fed.wait_ready(ready_timeout_s)
            yield fed
        finally:
            fed.stop()


if __name__ == "__main__":
    sys.exit(main())
