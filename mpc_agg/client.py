"""The client role: encode, share and upload one vector per round.

docs/design.md, "Processes". ``Client(topology, client_id).submit(round_id, vector)``
clips and encodes the vector, splits it into one additive share per aggregator (one full
share, the others 16-byte seeds) and uploads all of them concurrently. Retries resend the
same bytes, so they are idempotent. With a ``secret`` (:func:`load_client_secret`), every
random choice is derived from it, so a *restarted* client resends the same bytes too.

A full share larger than ``stream_above_bytes`` (64 MiB by default: ``d`` above 8 million
in GF(p)) is sent as it is made, block by block (:mod:`mpc_agg.core.share_stream`): no
vector-sized buffer exists on the client, whatever ``d``.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import xxhash

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.share_stream import DEFAULT_BLOCK_BYTES, StreamedShard, shard_streamed
from mpc_agg.core.sharing import ShareKind, full_share_index, shard_in_place
from mpc_agg.core.xof import CLIENT_SECRET_MIN_BYTES, ClientSecret, vector_digest
from mpc_agg.errors import (
    ConfigError,
    EncodingError,
    RemoteRefusal,
    TopologyMismatchError,
    UploadRefused,
    UsageError,
)
from mpc_agg.storage.durable import create_private, fsync_directory, read_private
from mpc_agg.transport.http_client import (
    AggregatorAPI,
    KeptSession,
    StreamedBody,
    produce_ahead,
    tokens_per_aggregator,
)

STREAM_ABOVE_BYTES = 64 << 20
"""Default ``Client(stream_above_bytes=...)``: a larger full-share body is streamed."""

INLINE_PREPARE_BYTES = 256 << 10
"""A full-share body up to this size is prepared on the event loop: below it, the thread hop
costs more than the work (under a millisecond)."""

Body = bytes | bytearray | StreamedBody


@dataclass(frozen=True)
class SubmitReceipt:
    """Outcome of a successful submission: every aggregator holds its share.

    ``retries`` lists aggregators (in index order) that answered "identical share already
    held" (200).
    ``upload_bytes`` is the total sent to all aggregators.
    """

    round_id: str
    client_id: str
    retries: tuple[int, ...]
    upload_bytes: int


class Client:
    """A data owner submitting vectors to the aggregators of ``topology``.

    ``token``: the client's bearer token(s), required unless the topology is ``insecure``: one
    token per aggregator, as a sequence or as the comma-separated line printed by
    launcher's ``LocalDeployment.client_tokens`` (a single token is sent to every aggregator).
    ``timeout_s``: per-request timeout (a streamed full share's attempt gets it plus the
    topology's ``deadlines.upload_s``, what an aggregator allows for receiving one body).
    ``retry_budget_s``: how long an upload keeps being
    retried while an aggregator answers busy (503 with ``Retry-After``, 408, resets), with
    jittered backoff (default: the topology's ``deadlines.upload_s``, the round's upload
    deadline); ``retries``: attempts after other transient failures (connection refused,
    timeouts, 5xx) and the least number of busy retries.

    ``secret`` (at least 16 bytes, e.g. from :func:`load_client_secret`): derive the seeds
    and rounding coins from it (:class:`~mpc_agg.core.xof.ClientSecret`), so that a new
    ``Client`` with the same secret, id and topology, after a crash, resubmits the same vector
    to the same round byte for byte and every aggregator answers "identical retry" (200). The
    secret is as sensitive as the vectors (with it and one aggregator's full share, a vector
    follows): keep it on the client. Without it, seeds and coins come from the OS and only
    this object's retries are identical. ``rng``: source of rounding coins (default: a
    generator seeded from the OS); ``random_bytes``: seed source (default:
    ``secrets.token_bytes``). Inject those two only in tests of the whole-body path, and
    not with ``secret``.

    Large vectors: a full-share body of more than ``stream_above_bytes`` bytes is built and
    sent block by block (:meth:`prepare_streamed`), its seed shares after it. Its seeds and
    coins always come from a :class:`~mpc_agg.core.xof.ClientSecret`: ``secret``, or else
    one drawn from the OS when this object is made and held by it (never ``rng`` or
    ``random_bytes``), so that this object's retries resend the same bytes without keeping
    the body. Each attempt reads the vector again: if it changed since the seeds were
    settled, the submission stops with
    :class:`~mpc_agg.errors.VectorChanged` before any changed byte is sent, and
    sends no seed share (submit a copy the caller's code does not write to).

    Connections: ``async with Client(...) as client:`` keeps one HTTP session, and so its
    connections to the aggregators (TCP and TLS handshakes done once), for every
    ``submit_async`` inside the block; ``session`` (an ``aiohttp.ClientSession`` the caller
    owns and closes) shares one among many clients of one process (a simulation, a
    benchmark). The blocking :meth:`submit` keeps its own event loop and session between
    calls, until :meth:`close` (or ``with Client(...) as client:``, or the object's end).
    Otherwise each submission opens and closes its own connections.
    """

    def __init__(
        self,
        topology: Topology,
        client_id: str,
        token: str | Sequence[str] | None = None,
        *,
        timeout_s: float = 60.0,
        retries: int = 3,
        retry_budget_s: float | None = None,
        rng: np.random.Generator | None = None,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        secret: bytes | None = None,
        session: aiohttp.ClientSession | None = None,
        stream_above_bytes: int = STREAM_ABOVE_BYTES,
    ) -> None:
        self.topology = topology
        self.client_id = codec.check_id("client", client_id)
        self._tokens = tokens_per_aggregator(token, topology.m)
        self.fingerprint = fingerprint(topology)
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_budget_s = (
            topology.deadlines.upload_s if retry_budget_s is None else retry_budget_s
        )
        if secret is not None and (rng is not None or random_bytes is not secrets.token_bytes):
            raise UsageError("pass secret, or rng/random_bytes (tests), not both")
        self._secret = None if secret is None else ClientSecret(secret)
        self._rng = rng if rng is not None else np.random.default_rng()
        self._random_bytes = random_bytes
        if (
            isinstance(stream_above_bytes, bool)
            or not isinstance(stream_above_bytes, int)
            or stream_above_bytes < 0
        ):
            raise UsageError(
                f"stream_above_bytes must be an integer >= 0, got {stream_above_bytes!r}"
            )
        self.stream_above_bytes = stream_above_bytes
        # The randomness of streamed submissions without a secret (class docstring).
        self._stream_secret = self._secret or ClientSecret(secrets.token_bytes(32))
        self._prepared: dict[str, tuple[bytes, list[bytes | bytearray]]] = {}
        self._session = KeptSession(timeout_s, session)
        weakref.finalize(self, self._session.close_blocking)

    def __repr__(self) -> str:
        return f"Client({self.client_id!r}, topology={self.topology.name!r})"

    async def __aenter__(self) -> Client:
        self._session.keep()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections kept by ``async with`` (not a ``session`` passed in)."""
        await self._session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the event loop and connections the blocking :meth:`submit` keeps."""
        self._session.close_blocking()

    def prepare(self, round_id: str, vector: npt.ArrayLike) -> list[bytes | bytearray]:
        """Encode and shard ``vector``: the upload body for each aggregator, in index order.

        With a secret, a deterministic function of (secret, topology, round, client,
        vector): the coins are drawn from the secret's stream for (round, client), the seeds
        derived for each aggregator and the SHA-256 of the encoded vector.
        """
        codec.check_id("round", round_id)
        m = self.topology.m
        full = full_share_index(self.client_id, m)
        d = _dimension(vector)
        # The vector is encoded straight into the full share's upload body, and the seeds'
        # expansions are subtracted there: one vector-sized buffer, no copies. The vector is
        # read once, here: the seeds are bound to what was read (the digest of ``vec``) and
        # every retry resends these bodies, so a vector that changes later (or meanwhile)
        # cannot make two bodies under the same seeds, unlike the streamed path, which
        # checks each block it reads again (mpc_agg.core.share_stream).
        ring = self.topology.encoding.ring
        body, vec = codec.full_share_body(full, d, ring)
        if self._secret is None:
            self.topology.encoding.encode(vector, self._rng, out=vec)
            seed_for = None
        else:
            coins = self._secret.coins(self.fingerprint, round_id, self.client_id)
            self.topology.encoding.encode(vector, coins, out=vec)
            seed_for = functools.partial(
                self._secret.seed,
                self.fingerprint,
                round_id,
                self.client_id,
                vector_digest=vector_digest(vec),
            )
        shares = shard_in_place(
            vec,
            round_id,
            self.client_id,
            m,
            full_index=full,
            random_bytes=self._random_bytes,
            seed_for=seed_for,
            ring=ring,
        )
        return [body if s.aggregator == full else codec.encode_share(s) for s in shares]

    def prepare_streamed(
        self, round_id: str, vector: npt.ArrayLike, *, block_bytes: int = DEFAULT_BLOCK_BYTES
    ) -> StreamedShard:
        """Encode and shard ``vector`` for sending the full share block by block, in O(block)
        memory besides ``vector`` (which must not change until the submission ends:
        ``chunks()`` raises :class:`~mpc_agg.errors.VectorChanged` at the first
        block that did).

        With a secret, ``b"".join(result.chunks())`` and ``result.seed_bodies()`` are the
        bytes of :meth:`prepare`. Without one, the seeds and coins come from this object's
        own random secret (class docstring), so they differ from :meth:`prepare`'s but are
        the same at every call with the same vector. Costs two or three passes over the
        vector before the first byte (:mod:`mpc_agg.core.share_stream`).
        """
        codec.check_id("round", round_id)
        secret = self._stream_secret
        fp, client = self.fingerprint, self.client_id

        def seed_for(aggregator: int, attempt: int, digest: bytes) -> bytes:
            return secret.seed(fp, round_id, client, aggregator, attempt, digest)

        return shard_streamed(
            vector,
            self.topology.encoding,
            round_id,
            client,
            self.topology.m,
            coins=functools.partial(secret.coins, fp, round_id, client),
            seed_for=seed_for,
            block_bytes=block_bytes,
        )

    def submit(self, round_id: str, vector: npt.ArrayLike) -> SubmitReceipt:
        """Encode, share and upload ``vector`` to every aggregator (blocking).

        Raises :class:`~mpc_agg.errors.UploadRefused` when an aggregator refuses (a different
        vector already submitted for this round, wrong dimension, round not open, ...), and
        :class:`~mpc_agg.errors.AggregatorUnavailable` when one cannot be reached.
        """
        return self._session.run_blocking(
            functools.partial(self.submit_async, round_id, vector), "submit"
        )

    async def submit_async(self, round_id: str, vector: npt.ArrayLike) -> SubmitReceipt:
        """Asynchronous :meth:`submit`.

        Submitting the same vector to the same round again (say, after an aggregator was
        unreachable) resends the very same shares, so aggregators that already hold them
        answer "identical retry" and the others accept them: retries are idempotent. With a
        ``secret``, so does a new ``Client`` (after a crash, in another process).

        A full share of more than ``stream_above_bytes`` is streamed (class docstring);
        ``vector`` must not change until this returns (each retry reads it again): if it
        does, :class:`~mpc_agg.errors.VectorChanged` (an
        :class:`~mpc_agg.errors.EncodingError`, code ``vector_changed``) is raised, not
        retried, after nothing of the changed part and no seed share was sent.
        """
        codec.check_id("round", round_id)
        full_bytes = codec.share_body_length(
            ShareKind.FULL, _dimension(vector), self.topology.encoding.ring
        )
        if full_bytes > self.stream_above_bytes:
            return await self._submit_streamed(round_id, vector)
        # A fingerprint of the vector, not a copy of it: XXH3 at memory speed.
        key = xxhash.xxh3_128_digest(np.ascontiguousarray(vector, dtype=np.float64).data)
        cached = self._prepared.get(round_id)
        if cached is not None and cached[0] == key:
            bodies = cached[1]
        else:
            if full_bytes <= INLINE_PREPARE_BYTES:
                bodies = self.prepare(round_id, vector)
            else:
                # O(d) numpy and AES work, off the event loop: other uploads keep flowing.
                bodies = await asyncio.to_thread(self.prepare, round_id, vector)
            self._prepared.clear()  # keep only the latest round's shares (O(d) memory)
            self._prepared[round_id] = (key, bodies)
        return await self.upload(round_id, bodies)

    async def _submit_streamed(self, round_id: str, vector: npt.ArrayLike) -> SubmitReceipt:
        """:meth:`submit_async` for a large vector: the full share streamed, then the seeds.

        Nothing here holds a body: each attempt of the full share's upload makes it again
        from ``vector`` (identical bytes, each block checked against the digests the seeds
        were settled with), and ``_prepared`` is not used.
        """
        # The passes that settle the seeds (O(d) numpy and AES work) run off the loop.
        shard = await asyncio.to_thread(self.prepare_streamed, round_id, vector)
        # An attempt may take as long as an aggregator allows for receiving one body.
        attempt_s = self.timeout_s + self.topology.deadlines.upload_s
        full = StreamedBody(shard.length, lambda: produce_ahead(shard.chunks()), attempt_s)
        # The seed shares go only once the full share is accepted. Their seeds were settled
        # (streams checked for the rejected word) before the first byte of the full share, so
        # a seed that was sent is always the one the full share was made with; and a full
        # share refused or cut (409, 413, a lost connection, a crash) leaves no seed share at
        # the other aggregators either: nothing of the submission is held anywhere, and a
        # retry starts from a clean slate. The seed uploads are tiny: the order costs one
        # round trip. A vector that changed under a retry (VectorChanged, raised by the
        # producer and never retried) ends the first phase, so no seed share goes either.
        return await self._send(round_id, [{shard.full_index: full}, shard.seed_bodies()])

    async def upload(
        self,
        round_id: str,
        bodies: list[bytes | bytearray],
        aggregators: list[int] | None = None,
    ) -> SubmitReceipt:
        """Upload prepared ``bodies`` concurrently to ``aggregators`` (default: all)."""
        targets = list(range(self.topology.m)) if aggregators is None else aggregators
        return await self._send(round_id, [{i: bodies[i] for i in targets}])

    async def _send(self, round_id: str, phases: list[Mapping[int, Body]]) -> SubmitReceipt:
        """Upload each phase's bodies (by aggregator index) concurrently, one phase after
        the other; a phase with a failure raises before the next starts (``accepted`` of
        an :class:`UploadRefused` names every aggregator that accepted so far)."""
        path = f"/v1/rounds/{round_id}/shares/{self.client_id}"
        accepted: list[int] = []
        retries: list[int] = []
        sent = 0
        async with self._session() as session:
            for phase in phases:
                targets = list(phase)
                outcomes = await asyncio.gather(
                    *(self._put(session, i, path, phase[i]) for i in targets),
                    return_exceptions=True,
                )
                for i, o in zip(targets, outcomes, strict=True):
                    if isinstance(o, tuple):
                        accepted.append(i)
                        if o[0] == 200:
                            retries.append(i)
                for o in outcomes:
                    if isinstance(o, TopologyMismatchError):
                        raise o
                for o in outcomes:
                    if isinstance(o, RemoteRefusal):
                        raise UploadRefused(
                            o.aggregator, o.status, o.code, o.detail, accepted=tuple(accepted)
                        )
                for o in outcomes:
                    if isinstance(o, BaseException):  # AggregatorUnavailable, or a local bug
                        raise o
                sent += sum(_length(phase[i]) for i in targets)
        return SubmitReceipt(round_id, self.client_id, tuple(sorted(retries)), sent)

    async def _put(
        self, session: aiohttp.ClientSession, index: int, path: str, body: Body
    ) -> tuple[int, bytes]:
        api = AggregatorAPI(
            session,
            self.topology.aggregators[index],
            token=self._tokens[index],
            fingerprint=self.fingerprint,
            retries=self.retries,
            retry_budget_s=self.retry_budget_s,
        )
        if isinstance(body, StreamedBody):
            return await api.request("PUT", path, stream=body)
        return await api.request("PUT", path, data=body)


def _dimension(vector: npt.ArrayLike) -> int:
    """The length of 1-D ``vector``; :class:`EncodingError` for any other shape."""
    if np.ndim(vector) != 1:
        raise EncodingError(f"vector must be 1-dimensional, got shape {np.shape(vector)}")
    return int(np.shape(vector)[0])


def _length(body: Body) -> int:
    return body.length if isinstance(body, StreamedBody) else len(body)


_SECRET_PATH = "client secret"


def load_client_secret(path: str | Path, create: bool = True) -> bytes:
    """The client secret kept in ``path`` (hex), made first if absent and ``create``.

    A new file holds 32 bytes from the OS CSPRNG as hex, created exclusively (an existing
    file is never overwritten) with mode 0600 and fsync'd, as is its directory. Raises
    :class:`~mpc_agg.errors.ConfigError` naming the file: missing (without ``create``),
    unreadable, accessible to group or others (``chmod 600`` it), or not hex of at least
    16 bytes.

    Keep the file as private as the vectors it protects (see :class:`Client`, ``secret``);
    losing it only costs the ability to resubmit rounds started before the loss.
    """
    path = Path(path)
    if create:
        try:
            create_private(path, (secrets.token_bytes(32).hex() + "\n").encode("ascii"))
        except FileExistsError:
            pass  # the usual case: read it below
        except OSError as exc:
            raise ConfigError(
                _SECRET_PATH, f"cannot create {str(path)!r}: {exc.strerror}"
            ) from None
        else:
            fsync_directory(path.parent)
    data = read_private(path, _SECRET_PATH, max_bytes=4096)
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) < CLIENT_SECRET_MIN_BYTES:
        raise ConfigError(
            _SECRET_PATH,
            f"{str(path)!r} must hold at least {CLIENT_SECRET_MIN_BYTES} bytes as hex "
            "(an empty file is left by a crash during its creation: delete it)",
        )
    return secret
