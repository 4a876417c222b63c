"""The collector role: open rounds on every aggregator, trigger aggregation, fetch the total.

docs/design.md, "Processes". The collector opens a round on each aggregator (same id and
dimension), asks the leader to close it once clients have submitted, polls the leader for
the revealed total, fetches every aggregator's signed result statement and accepts the
total only if all of them vouch for it (:func:`verify_statements`); it decodes it with the
topology's encoding. A result saved with :meth:`AggregateResult.save` can be re-checked
by anyone holding the topology (:func:`load_and_verify`, or :func:`verify_saved` block by
block).

Long totals (README, "Command line", ``collect``): ``aggregate(..., out="total.npy")``
reads the leader's result as a stream, header first, then the total a slice
(:data:`~mpc_agg.core.codec.RESULT_SLICE` elements) at a time: each slice is checked,
hashed into the digest the statements must match (:class:`~mpc_agg.core.statement.
TotalDigest`) and written, decoded, into a memory-mapped ``.npy`` at a hidden temporary
name next to ``out``, its ring elements into an unnamed temporary file in the same
directory. Only once every statement verifies is the ``.npy`` renamed to ``out``; any
failure (a refused or cut stream, a digest that does not match) deletes both, so no
half-written file is ever presented as a result. The collector's memory stays flat: a few
slices, whatever d is. The hidden name is created exclusively (never an existing file, nor
the target of a symlink planted there); one left by a collector that was killed is deleted
by the next one writing the same ``out`` (:func:`_sweep_partials`).
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import re
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import numpy as np
import numpy.typing as npt

from mpc_agg.config.fingerprint import TOPOLOGY_HEADER, fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import Ring, RingArray, ring_of
from mpc_agg.core.statement import (
    DIGEST_BLOCK,
    ResultStatement,
    SignedStatement,
    TotalDigest,
    verify_result,
    verify_result_digest,
)
from mpc_agg.errors import (
    AggregationTimeout,
    AggregatorUnavailable,
    EncodingError,
    MalformedUpload,
    RemoteRefusal,
    RoundFailed,
    TopologyMismatch,
    TopologyMismatchError,
    UsageError,
)
from mpc_agg.storage.durable import fsync_directory
from mpc_agg.transport.http_client import (
    BUSY_STATUSES,
    AggregatorAPI,
    KeptSession,
    parse_error,
    retry_after_s,
    run_sync,
    tokens_per_aggregator,
)
from mpc_agg.transport.tls import https_client_context

T = TypeVar("T")


@dataclass(frozen=True)
class AggregateResult:
    """A revealed round.

    ``total``: the decoded sum (float64, length d); ``field_total``: the exact sum in the
    topology's ring (``uint64`` in GF(p), ``uint32`` in Z_(2^32));
    ``num_clients``: clients counted; ``dropped_clients``: partial uploads left out;
    ``epsilon``/``delta``: the round's privacy cost (None without DP);
    ``noise_stddev``: standard deviation of the noise in each coordinate of ``total``
    (output units; None without DP); ``cumulative_epsilon``/``cumulative_delta``: the
    privacy spent by all rounds so far, this one included (None without DP);
    ``timings``: seconds spent by phase at the leader; ``statements``: every aggregator's
    signed result statement (JSON form), which :func:`verify_statements` checks again later.

    From ``aggregate(..., out=path)``, ``total`` is a read-only memory map of the ``.npy``
    at ``path`` and ``field_total`` a read-only memory map of an unnamed temporary file in
    the same directory (on disk, not in memory; the file goes when the last reference to
    the map does), so neither is ever whole in memory; :meth:`save` copies it into the
    ``.npz`` a block at a time.

    ``num_clients``, ``dropped_clients``, ``epsilon``, ``delta`` and ``noise_stddev`` are
    the values all aggregators signed; ``cumulative_*`` and ``timings`` are the leader's
    word alone.
    """

    round_id: str
    total: npt.NDArray[np.float64]
    field_total: RingArray
    num_clients: int
    dropped_clients: int
    epsilon: float | None
    delta: float | None
    noise_stddev: float | None = None
    cumulative_epsilon: float | None = None
    cumulative_delta: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    statements: tuple[dict[str, Any], ...] = ()

    def save(self, path: str | Path) -> None:
        """Write the exact total and the statements to ``path`` (``.npz``, the suffix added
        if missing), so anyone with the topology can check them later
        (:func:`load_and_verify`, :func:`verify_saved`). The file is written at a temporary
        name and renamed when complete; numpy copies a memory-mapped total 16 MiB at a
        time."""
        target = Path(path)
        if target.suffix != ".npz":
            target = target.with_name(target.name + ".npz")
        partial, fd = _create_partial(target)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    round_id=np.array(self.round_id),
                    field_total=np.asarray(self.field_total),  # uint64 or uint32: the ring
                    statements=np.array(json.dumps(list(self.statements))),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
            fsync_directory(target.parent)
        finally:
            partial.unlink(missing_ok=True)


def verify_statements(
    topology: Topology, round_id: str, field_total: RingArray, statements: Sequence[Any]
) -> ResultStatement:
    """Check that every aggregator of ``topology`` signed a statement vouching for
    ``field_total`` of ``round_id`` under this topology; returns the agreed statement or
    raises :class:`~mpc_agg.core.statement.ResultMismatch` (README, "Security model")."""
    signed, keys = _signed_and_keys(topology, statements)
    return verify_result(field_total, signed, keys, fingerprint(topology), round_id)


def verify_statements_digest(
    topology: Topology, round_id: str, digest: str, dim: int, statements: Sequence[Any]
) -> ResultStatement:
    """:func:`verify_statements` for a total known by its length ``dim`` and its digest
    (:class:`~mpc_agg.core.statement.TotalDigest`, computed as it streamed past)."""
    signed, keys = _signed_and_keys(topology, statements)
    return verify_result_digest(digest, dim, signed, keys, fingerprint(topology), round_id)


def _signed_and_keys(
    topology: Topology, statements: Sequence[Any]
) -> tuple[list[SignedStatement], list[bytes]]:
    if not topology.has_keys:
        raise UsageError(
            "this topology names no signing keys (a template): verify against the topology "
            "the aggregators run"
        )
    signed = [SignedStatement.from_json(st) for st in statements]
    keys = [bytes.fromhex(str(a.signing_key)) for a in topology.aggregators]
    return signed, keys


def load_and_verify(topology: Topology, path: str | Path) -> AggregateResult:
    """A result saved with :meth:`AggregateResult.save`, verified against ``topology``."""
    with np.load(path, allow_pickle=False) as data:
        round_id = str(data["round_id"])
        total = np.ascontiguousarray(data["field_total"])  # its dtype names its ring
        statements = json.loads(str(data["statements"]))
    return _verified_result(topology, round_id, total, statements, {})


def verify_saved(topology: Topology, path: str | Path) -> ResultStatement:
    """Verify a result saved with :meth:`AggregateResult.save` against ``topology`` without
    loading its total: the ``field_total`` member is read from the ``.npz`` and hashed
    :data:`~mpc_agg.core.statement.DIGEST_BLOCK` elements at a time (files written before
    streaming existed, compressed ones too). Returns the agreed statement; raises
    :class:`~mpc_agg.core.statement.ResultMismatch`, or :class:`EncodingError` for a file
    that does not hold a 1-D total of ring elements."""
    with np.load(path, allow_pickle=False) as data:
        round_id = str(data["round_id"])
        statements = json.loads(str(data["statements"]))
        with data.zip.open("field_total.npy") as member:
            digest, dim = _digest_npy_stream(member, str(path))
    return verify_statements_digest(topology, round_id, digest, dim, statements)


def _digest_npy_stream(stream: IO[bytes], what: str) -> tuple[str, int]:
    """The :func:`~mpc_agg.core.statement.total_digest` and length of the 1-D ``.npy``
    array that ``stream`` holds, read a block at a time."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise EncodingError(f"{what}: field_total is a .npy of version {version}")
    if len(shape) != 1 or dtype.kind != "u":
        raise EncodingError(
            f"{what}: field_total must be a 1-D vector of ring elements, got shape {shape} "
            f"of {dtype}"
        )
    try:
        ring = ring_of(np.empty(0, dtype=dtype))
    except ValueError:
        raise EncodingError(
            f"{what}: field_total has dtype {dtype}, not uint64 (gf_p61) or uint32 (z2_32)"
        ) from None
    d = int(shape[0])
    digest = TotalDigest(ring, d)
    while digest.done < d:
        n = min(DIGEST_BLOCK, d - digest.done)
        raw = stream.read(n * dtype.itemsize)
        if len(raw) != n * dtype.itemsize:
            raise EncodingError(f"{what}: field_total ends after {digest.done} of {d} values")
        digest.update(np.frombuffer(raw, dtype=dtype))
    if stream.read(1):
        raise EncodingError(f"{what}: field_total has bytes after its {d} values")
    return digest.hexdigest(), d


def _verified_result(
    topology: Topology,
    round_id: str,
    total: RingArray,
    statements: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> AggregateResult:
    st = verify_statements(topology, round_id, total, statements)
    return _result(st, round_id, topology.encoding.decode(total), total, statements, meta)


def _result(
    st: ResultStatement,
    round_id: str,
    total: npt.NDArray[np.float64],
    field_total: RingArray,
    statements: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> AggregateResult:
    return AggregateResult(
        round_id=round_id,
        total=total,
        field_total=field_total,
        num_clients=st.num_clients,
        dropped_clients=st.dropped_clients,
        epsilon=st.epsilon,
        delta=st.delta,
        noise_stddev=st.noise_stddev,
        cumulative_epsilon=meta.get("cumulative_epsilon"),
        cumulative_delta=meta.get("cumulative_delta"),
        timings=dict(meta.get("timings", {})),
        statements=tuple(statements),
    )


class Collector:
    """Orchestrates rounds for the aggregators of ``topology``.

    ``token``: the collector's bearer tokens, required unless the topology is ``insecure``:
    one per aggregator (each aggregator issues its own: ``collector.token`` in its party
    directory), as a sequence or a comma-separated line; a single token is sent to all.
    """

    def __init__(
        self,
        topology: Topology,
        token: str | Sequence[str] | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
    ) -> None:
        self.topology = topology
        self._tokens = tokens_per_aggregator(token, topology.m)
        self.fingerprint = fingerprint(topology)
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = KeptSession(timeout_s)

    def __repr__(self) -> str:
        return f"Collector(topology={self.topology.name!r})"

    async def __aenter__(self) -> Collector:
        """``async with Collector(...)``: one session, so its connections to the
        aggregators, kept for every call inside the block."""
        self._session.keep()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    def _apis(self, session: Any) -> list[AggregatorAPI]:
        return [
            AggregatorAPI(
                session,
                a,
                token=self._tokens[a.index],
                fingerprint=self.fingerprint,
                retries=self.retries,
            )
            for a in self.topology.aggregators
        ]

    # -- open ------------------------------------------------------------------------

    def open_round(self, round_id: str, dim: int, *, min_clients: int | None = None) -> None:
        """Open ``round_id`` for vectors of length ``dim`` on every aggregator (idempotent)."""
        run_sync(self.open_round_async(round_id, dim, min_clients=min_clients), "open_round")

    async def open_round_async(
        self, round_id: str, dim: int, *, min_clients: int | None = None
    ) -> None:
        codec.check_id("round", round_id)
        body: dict[str, Any] = {"dim": dim}
        if min_clients is not None:
            body["min_clients"] = min_clients
        async with self._session() as session:
            await asyncio.gather(
                *(
                    api.request("PUT", f"/v1/rounds/{round_id}", json_body=body)
                    for api in self._apis(session)
                )
            )

    # -- status ----------------------------------------------------------------------

    def status(self, round_id: str) -> list[dict[str, Any]]:
        """Each aggregator's view of ``round_id`` (state, accepted count, ...)."""
        return run_sync(self.status_async(round_id), "status")

    async def status_async(self, round_id: str) -> list[dict[str, Any]]:
        async with self._session() as session:
            answers = await asyncio.gather(
                *(api.request("GET", f"/v1/rounds/{round_id}") for api in self._apis(session))
            )
        return [json.loads(body) for _, body in answers]

    def rounds(self) -> list[dict[str, Any]]:
        """Each aggregator's list of the rounds it knows (``GET /v1/rounds``), in aggregator
        order: ``{"aggregator", "max_open", "max_open_s", "live", "ended_not_listed",
        "rounds": [{"round", "state", "dim", "accepted", "failure_code", "opened",
        "deadline"}, ...]}`` with every live round and the most recent ended ones
        (``opened`` and ``deadline`` in Unix seconds)."""
        return run_sync(self.rounds_async(), "rounds")

    async def rounds_async(self) -> list[dict[str, Any]]:
        """:meth:`rounds` for code that already runs an event loop."""
        async with self._session() as session:
            answers = await asyncio.gather(
                *(api.request("GET", "/v1/rounds") for api in self._apis(session))
            )
        return [json.loads(body) for _, body in answers]

    # -- abort -----------------------------------------------------------------------

    def abort(self, round_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Abort ``round_id`` at every aggregator: the leader broadcasts the abort, every
        aggregator holding the round open fails it (failure code ``cancelled``) with
        nothing revealed and deletes its journal; the id stays used. Waits until the round
        has ended at the leader and returns the leader's status of it (``state`` is
        ``failed``, or ``done`` if it had been revealed before). Idempotent: aborting an
        ended round returns its status.

        Raises :class:`~mpc_agg.errors.RemoteRefusal` with code ``unknown_round`` if the
        leader never opened the round (one opened only at followers fails there at its
        deadline) or ``round_not_open`` if its aggregation has started;
        :class:`~mpc_agg.errors.AggregationTimeout` after ``timeout`` seconds.
        """
        return run_sync(self.abort_async(round_id, timeout=timeout), "abort")

    async def abort_async(self, round_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """:meth:`abort` for code that already runs an event loop."""
        codec.check_id("round", round_id)
        deadline = time.monotonic() + timeout
        late = f"round {round_id!r} did not end within {timeout} s of its abort"
        path = f"/v1/rounds/{round_id}"
        async with self._session() as session:
            leader = self._apis(session)[0]

            async def ask(method: str) -> dict[str, Any]:
                try:
                    _, body = await leader.request(method, path, deadline=deadline)
                except AggregationTimeout as exc:
                    raise AggregationTimeout(f"{late}: {exc}") from None
                answer: dict[str, Any] = json.loads(body)
                return answer

            status = await ask("DELETE")
            delay = 0.02
            while status.get("state") not in ("done", "failed"):
                if time.monotonic() + delay > deadline:
                    raise AggregationTimeout(late)
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
                status = await ask("GET")
        return status

    # -- aggregate -------------------------------------------------------------------

    def aggregate(
        self, round_id: str, timeout: float = 120.0, *, out: str | Path | None = None
    ) -> AggregateResult:
        """Close ``round_id``, wait for the reveal and return the result.

        With ``out`` (a path ending in ``.npy`` in an existing directory; an existing file
        there is replaced), the total is streamed into that memory-mapped file and the
        result holds memory maps, never the whole total in memory (module docstring); the
        file appears only once every statement verified. Without it, the total is read
        whole into memory.

        Raises :class:`~mpc_agg.errors.RoundFailed` when the round failed (e.g. fewer than
        ``min_clients`` complete uploads: nothing is revealed) and
        :class:`~mpc_agg.errors.AggregationTimeout` after ``timeout`` seconds.
        """
        return run_sync(self.aggregate_async(round_id, timeout=timeout, out=out), "aggregate")

    async def aggregate_async(
        self, round_id: str, timeout: float = 120.0, *, out: str | Path | None = None
    ) -> AggregateResult:
        """:meth:`aggregate` for code that already runs an event loop."""
        codec.check_id("round", round_id)
        target = None if out is None else _npy_target(out)  # before the round is closed
        deadline = time.monotonic() + timeout
        late = f"round {round_id!r} did not finish within {timeout} s"
        async with self._session() as session:
            leader = self._apis(session)[0]
            while True:  # the leader refuses to close while the party network is down
                try:
                    await leader.request("POST", f"/v1/rounds/{round_id}/close", deadline=deadline)
                    break
                except AggregationTimeout as exc:
                    raise AggregationTimeout(f"{late}: {exc}") from None
                except RemoteRefusal as exc:
                    if exc.code != "party_network_down":
                        raise
                    if time.monotonic() + 0.5 > deadline:
                        raise AggregationTimeout(f"{late}: {exc.detail}") from None
                    await asyncio.sleep(0.5)
            if target is not None:
                return await self._aggregate_into(session, target, round_id, deadline, late)
            body = await _poll_until_done(leader, round_id, "result", deadline, late)
            total, meta = codec.decode_result(body, self.topology.encoding.ring)
            if not self.topology.has_keys:  # an in-process topology: nothing to verify with
                return _unverified_result(self.topology, round_id, total, meta)
            answers = await asyncio.gather(
                *(
                    _poll_until_done(api, round_id, "statement", deadline, late)
                    for api in self._apis(session)
                )
            )
        statements = [json.loads(raw) for raw in answers]
        return _verified_result(self.topology, round_id, total, statements, meta)

    async def _aggregate_into(
        self, session: Any, target: Path, round_id: str, deadline: float, late: str
    ) -> AggregateResult:
        """The closed round's result streamed into ``target`` (``aggregate(out=...)``):
        published only once verified, nothing left behind otherwise."""
        apis = self._apis(session)

        async def read(resp: aiohttp.ClientResponse) -> tuple[_StreamedTotal, dict[str, Any]]:
            return await _read_result(resp, self.topology, target)

        streamed, meta = await _fetch_result(
            apis[0], round_id, deadline, late, self.timeout_s, read
        )
        try:
            if not self.topology.has_keys:  # an in-process topology: nothing to verify with
                total, field_total = streamed.publish()
                return _unverified_result(self.topology, round_id, field_total, meta, total)
            answers = await asyncio.gather(
                *(_poll_until_done(api, round_id, "statement", deadline, late) for api in apis)
            )
            statements = [json.loads(raw) for raw in answers]
            st = verify_statements_digest(
                self.topology, round_id, streamed.digest.hexdigest(), streamed.dim, statements
            )
            total, field_total = streamed.publish()
        except BaseException:
            streamed.discard()
            raise
        return _result(st, round_id, total, field_total, statements, meta)


def _npy_target(out: str | Path) -> Path:
    """``out`` as the path of a ``.npy`` to write; UsageError unless it ends in ``.npy``
    and its directory exists."""
    target = Path(out)
    if target.suffix.lower() != ".npy":
        raise UsageError(f"out {str(out)!r}: a streamed total is written as .npy")
    if not target.parent.is_dir():
        raise UsageError(f"out {str(out)!r}: directory {str(target.parent)!r} does not exist")
    return target


def _partial_name(target: Path) -> Path:
    """A hidden name next to ``target`` for writing it before it is complete."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


_LOADED_AT = time.time()
"""When this process loaded the collector (wall clock, as file times): a partial file last
written before it was made by an earlier process."""

_PARTIAL_NAMES = 3
"""Names drawn for a partial file before giving up (each a fresh random one)."""

_MADE: set[tuple[int, int]] = set()
"""The partial files this process created, as (device, inode): one per collection or save,
never deleted by :func:`_sweep_partials` whatever their times say."""


def _create_partial(target: Path) -> tuple[Path, int]:
    """A new file at a hidden name next to ``target`` (:func:`_partial_name`), created
    exclusively, mode 0666 less the umask, as ``(path, read-write descriptor)``: an
    existing name, a symlink planted there included, is never opened (another name is
    drawn). Stale partial files of ``target`` are deleted first (:func:`_sweep_partials`)."""
    _sweep_partials(target)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    drawn = 0
    while True:
        partial = _partial_name(target)
        drawn += 1
        try:
            fd = os.open(partial, flags, 0o666)
        except FileExistsError:
            if drawn == _PARTIAL_NAMES:
                raise
            continue
        made = os.fstat(fd)
        _MADE.add((made.st_dev, made.st_ino))
        _hold(fd)  # while it is open, no other collector's sweep deletes it
        return partial, fd


def _hold(fd: int) -> None:
    """Take an exclusive ``flock`` on the partial file ``fd`` for as long as it is open: the
    proof of life :func:`_sweep_partials` asks for, which holds across PID namespaces (two
    containers sharing a volume, each collector pid 1) where a pid proves nothing. Off POSIX,
    nothing (and nothing is swept there either)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # pragma: no cover - a new file nobody else has opened yet
        pass


def _unlink_if_abandoned(path: str, st: os.stat_result) -> None:
    """Delete the partial file ``path`` (lstat ``st``) unless a live collector holds its
    lock (:func:`_hold`); a symlink is deleted, never followed."""
    import stat

    if stat.S_ISLNK(st.st_mode):
        os.unlink(path)
        return
    import fcntl

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its collector is alive (perhaps in another PID namespace)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    finally:
        os.close(fd)


def _process_gone(pid: int) -> bool:
    """True when no process ``pid`` exists here (one we may not signal exists; off POSIX,
    where signal 0 is no probe, every process is taken to exist)."""
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return False


def _sweep_partials(target: Path) -> None:
    """Delete the partial files of ``target`` a collector left when it was killed (SIGKILL,
    power loss) before it could delete them itself: names of exactly the pattern of
    :func:`_partial_name` for ``target``, last modified before this process loaded the
    collector, whose process is gone, or that carry this process's id but were not made by
    it (an earlier process had the same id), and whose lock no live collector holds
    (:func:`_hold`: a pid proves nothing across PID namespaces). A symlink of that name is
    deleted, never followed; a file that cannot be deleted is left."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.([0-9]{{1,10}})-[0-9a-f]{{8}}\.partial")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_mtime >= _LOADED_AT or (st.st_dev, st.st_ino) in _MADE:
                continue  # this process's own, or written since it started
            if pid == os.getpid() or _process_gone(pid):
                _unlink_if_abandoned(entry.path, st)
        except OSError:
            continue


def _npy_memmap(file: IO[bytes], dim: int) -> np.memmap[Any, Any]:
    """``file`` (new, empty) made a ``.npy`` of ``dim`` float64 values, mapped read-write:
    the header of :func:`numpy.lib.format.open_memmap`, then the values (zeros)."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
        "fortran_order": False,
        "shape": (dim,),
    }
    np.lib.format.write_array_header_1_0(file, header)
    offset = file.tell()
    file.truncate(offset + dim * 8)
    file.flush()
    return np.memmap(file, dtype=np.float64, mode="r+", offset=offset, shape=(dim,))


_RELEASE_BYTES = 16 << 20
"""Bytes written to a memory map between two hand-backs of its pages to the kernel."""


class _MappedVector:
    """A 1-D memory-mapped array written front to back, whose pages go back to the kernel
    (``MADV_DONTNEED``, Linux) every :data:`_RELEASE_BYTES`: in a shared file mapping the
    data stays in the page cache and the file, not in this process's resident memory."""

    def __init__(self, array: np.memmap[Any, Any]) -> None:
        self.array = array
        self._released = 0  # bytes of the array handed back so far

    def write(self, start: int, values: npt.NDArray[Any]) -> None:
        stop = start + values.shape[0]
        self.array[start:stop] = values
        itemsize = self.array.itemsize
        if (stop * itemsize - self._released) >= _RELEASE_BYTES or stop == self.array.shape[0]:
            self._release(stop * itemsize)

    def _release(self, upto: int) -> None:
        raw = getattr(self.array, "_mmap", None)  # numpy's mmap object of this map
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if raw is None or advice is None or not hasattr(raw, "madvise"):
            return
        base = self.array.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts in raw
        first = (base + self._released) // mmap.PAGESIZE * mmap.PAGESIZE
        last = base + upto
        if last > first:
            raw.madvise(advice, first, last - first)
        self._released = upto


class _StreamedTotal:
    """A streamed total being written: its decoded values into a ``.npy`` at a hidden name
    next to ``target``, its ring elements into an unnamed temporary file in the same
    directory, its digest computed as it goes. :meth:`publish` once it verified,
    :meth:`discard` otherwise."""

    def __init__(self, target: Path, encoding: FixedPointEncoding, dim: int) -> None:
        self.target = target
        self.encoding = encoding
        self.ring: Ring = encoding.ring
        self.dim = dim
        self.digest = TotalDigest(self.ring, dim)
        self.partial: Path | None = None
        self._file: IO[bytes] | None = None
        self._ring_file: IO[bytes] | None = None
        try:
            self.partial, fd = _create_partial(target)
            self._file = os.fdopen(fd, "r+b")
            self._floats = _MappedVector(_npy_memmap(self._file, dim))
            self._ring_file = tempfile.TemporaryFile(dir=target.parent)
            self._ring_file.truncate(dim * self.ring.itemsize)
            self._ring = _MappedVector(
                np.memmap(self._ring_file, dtype=self.ring.dtype, mode="r+", shape=(dim,))
            )
        except BaseException:
            self.discard()
            raise

    def __repr__(self) -> str:
        return f"_StreamedTotal({self.target}, {self.digest.done} of {self.dim})"

    def write(self, block: RingArray) -> None:
        """The next elements of the total (canonical, checked by the caller)."""
        start = self.digest.done
        self.digest.update(block)
        self._ring.write(start, block)
        self._floats.write(start, self.encoding.decode(block))

    def publish(self) -> tuple[npt.NDArray[np.float64], RingArray]:
        """Make the written ``.npy`` the file at ``target`` (durably) and return read-only
        maps of it and of the ring elements."""
        if self.digest.done != self.dim:
            raise EncodingError(f"the total has {self.dim} elements, {self.digest.done} written")
        assert self._ring_file is not None and self._file is not None
        assert self.partial is not None
        self._floats.array.flush()
        self._ring.array.flush()
        del self._floats, self._ring  # unmapped before the rename
        os.fsync(self._file.fileno())  # the file created, never one reopened by its name
        self._file.close()
        self._file = None
        os.replace(self.partial, self.target)
        fsync_directory(self.target.parent)
        total = np.load(self.target, mmap_mode="r")
        field_total = np.memmap(self._ring_file, dtype=self.ring.dtype, mode="r", shape=(self.dim,))
        self._ring_file.close()  # the map holds its own descriptor
        self._ring_file = None
        return total, field_total

    def discard(self) -> None:
        """Delete what was written (idempotent)."""
        self.__dict__.pop("_floats", None)
        self.__dict__.pop("_ring", None)
        if self._ring_file is not None:
            self._ring_file.close()
            self._ring_file = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)


async def _read_exactly(content: aiohttp.StreamReader, n: int, what: str) -> bytes:
    try:
        return await content.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise MalformedUpload(
            f"the result ends {len(exc.partial)} bytes into its {what} of {n} bytes"
        ) from None


async def _read_result(
    resp: aiohttp.ClientResponse, topology: Topology, target: Path
) -> tuple[_StreamedTotal, dict[str, Any]]:
    """Read a result body as a stream (:mod:`mpc_agg.core.codec`): the header is checked
    first (magic, version, ring, a dimension within ``rounds.max_dim``, the announced
    length), then the metadata, then each slice of the total is checked and written
    (:class:`_StreamedTotal`). Raises :class:`MalformedUpload` on any defect, having
    deleted what it wrote."""
    ring = topology.encoding.ring
    head = await _read_exactly(resp.content, codec.RESULT_HEADER.size, "header")
    dim, meta_len = codec.decode_result_header(head, ring)
    max_dim = topology.rounds.max_dim
    if not 1 <= dim <= max_dim:
        raise MalformedUpload(
            f"the result has dimension {dim}; this topology's rounds have 1..{max_dim}"
        )
    if meta_len > codec.MAX_RESULT_META:
        raise MalformedUpload(
            f"the result announces {meta_len} bytes of metadata, more than {codec.MAX_RESULT_META}"
        )
    expected = codec.result_body_length(ring, dim, meta_len)
    if resp.content_length is not None and resp.content_length != expected:
        raise MalformedUpload(
            f"result of dimension {dim} should be {expected} bytes, got {resp.content_length}"
        )
    meta = codec.decode_result_meta(await _read_exactly(resp.content, meta_len, "metadata"))
    streamed = _StreamedTotal(target, topology.encoding, dim)
    try:
        while streamed.digest.done < dim:
            n = min(codec.RESULT_SLICE, dim - streamed.digest.done)
            raw = await _read_exactly(resp.content, n * ring.itemsize, "total")
            streamed.write(codec.decode_result_block(raw, ring))
        if await resp.content.read(1):
            raise MalformedUpload(f"result of dimension {dim} has bytes after its total")
    except BaseException:
        streamed.discard()
        raise
    return streamed, meta


_ERROR_BODY_BYTES = 1 << 16
"""Bytes of an error answer read (an error body is a short JSON object)."""


async def _fetch_result(
    api: AggregatorAPI,
    round_id: str,
    deadline: float,
    late: str,
    read_timeout_s: float,
    read: Callable[[aiohttp.ClientResponse], Awaitable[T]],
) -> T:
    """GET the round's result until it is ready and return ``await read(response)`` of
    the 200 answer, its body unread: the streaming twin of :func:`_poll_until_done` and
    :meth:`AggregatorAPI.request` (the same answers retried: not ready yet, busy, a lost
    connection, a 5xx but 507; the same errors raised). A body cut mid-way is fetched
    again from its start (``read`` deleted what it wrote); ``read_timeout_s`` bounds each
    wait for more bytes, ``deadline`` the whole."""
    url = f"{api.address.url}/v1/rounds/{round_id}/result"
    headers = {"Authorization": f"Bearer {api.token}"} if api.token else {}
    if api.fingerprint is not None:
        headers[TOPOLOGY_HEADER] = api.fingerprint
    context = https_client_context(api.address)
    extra: dict[str, Any] = {} if context is None else {"ssl": context}
    poll, failures, busy, attempts = 0.02, 0, 0, 0
    last = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AggregationTimeout(
                f"{late}: no result from aggregator {api.address.index} ({last})"
            )
        timeout = aiohttp.ClientTimeout(total=remaining, sock_read=read_timeout_s)
        attempts += 1
        try:
            async with api.session.get(url, headers=headers, timeout=timeout, **extra) as resp:
                if resp.status == 200:
                    return await read(resp)
                status, retry_after = resp.status, retry_after_s(resp.headers.get("Retry-After"))
                body = await resp.content.read(_ERROR_BODY_BYTES)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() >= deadline:
                raise AggregationTimeout(f"{late}: {last}") from None
            failures += 1
            if failures > api.retries:
                raise AggregatorUnavailable(
                    api.address.index, url, f"{last} (after {attempts} attempts)"
                ) from None
            await asyncio.sleep(min(api.backoff_s * 2 ** (failures - 1), max(remaining, 0)))
            continue
        code, detail, failure = parse_error(status, body)
        last = f"HTTP {status} {code}"
        if code == "result_not_ready":
            delay, poll = poll, min(poll * 1.5, 0.5)
        elif code == "round_failed":
            raise RoundFailed(round_id, detail, failure or "unknown")
        elif status in BUSY_STATUSES and (status != 429 or retry_after is not None):
            busy += 1
            delay = max(api.backoff_s * 2 ** min(busy - 1, 5), retry_after or 0.0)
        elif status >= 500 and status != 507:
            failures += 1
            if failures > api.retries:
                raise AggregatorUnavailable(
                    api.address.index, url, f"{last} (after {attempts} attempts)"
                )
            delay = api.backoff_s * 2 ** (failures - 1)
        elif code == TopologyMismatch.code:
            raise TopologyMismatchError(api.address.index, detail)
        else:
            raise RemoteRefusal(api.address.index, status, code, detail, failure=failure)
        if time.monotonic() + delay > deadline:
            raise AggregationTimeout(late)
        await asyncio.sleep(delay)


async def _poll_until_done(
    api: AggregatorAPI, round_id: str, what: str, deadline: float, late: str
) -> bytes:
    """GET ``/v1/rounds/{round}/{what}`` until the round has ended there (backing off from
    20 ms to 0.5 s); raises RoundFailed if it failed, AggregationTimeout past ``deadline``."""
    delay = 0.02
    while True:
        try:
            _, body = await api.request("GET", f"/v1/rounds/{round_id}/{what}", deadline=deadline)
            return body
        except AggregationTimeout as exc:
            raise AggregationTimeout(f"{late}: {exc}") from None
        except RemoteRefusal as exc:
            if exc.code == "round_failed":
                raise RoundFailed(round_id, exc.detail, exc.failure or "unknown") from None
            if exc.code != "result_not_ready":
                raise
        if time.monotonic() + delay > deadline:
            raise AggregationTimeout(late)
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _unverified_result(
    topology: Topology,
    round_id: str,
    total: RingArray,
    meta: dict[str, Any],
    decoded: npt.NDArray[np.float64] | None = None,
) -> AggregateResult:
    return AggregateResult(
        round_id=round_id,
        total=topology.encoding.decode(total) if decoded is None else decoded,
        field_total=total,
        num_clients=int(meta["num_clients"]),
        dropped_clients=int(meta.get("dropped_clients", 0)),
        epsilon=meta.get("epsilon"),
        delta=meta.get("delta"),
        noise_stddev=meta.get("noise_stddev"),
        cumulative_epsilon=meta.get("cumulative_epsilon"),
        cumulative_delta=meta.get("cumulative_delta"),
        timings=dict(meta.get("timings", {})),
    )
