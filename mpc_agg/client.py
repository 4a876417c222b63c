"""The client role: encode, share and upload one vector per round.

docs/design.md, "Processes". ``Client(topology, client_id).submit(round_id, vector)``
clips and encodes the vector, splits it into one additive share per aggregator (one full
share, the others 16-byte seeds) and uploads all of them concurrently. Retries resend the
same bytes, so they are idempotent. With a ``secret`` (:func:`load_client_secret`), every
random choice is derived from it, so a *restarted* client resends the same bytes too.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import numpy.typing as npt
import xxhash

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.core import codec
from mpc_agg.core.sharing import full_share_index, shard_in_place
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
    run_sync,
    tokens_per_aggregator,
)


@dataclass(frozen=True)
class SubmitReceipt:
    """Outcome of a successful submission: every aggregator holds its share.

    ``retries`` lists aggregators that answered "identical share already held" (200).
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
    ``timeout_s``: per-request timeout. ``retry_budget_s``: how long an upload keeps being
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
    ``secrets.token_bytes``). Inject those two only in tests, and not with ``secret``.

    Connections: ``async with Client(...) as client:`` keeps one HTTP session, and so its
    connections to the aggregators (TCP and TLS handshakes done once), for every
    ``submit_async`` inside the block; ``session`` (an ``aiohttp.ClientSession`` the caller
    owns and closes) shares one among many clients of one process (a simulation, a
    benchmark). Otherwise each submission opens and closes its own connections.
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
        self._prepared: dict[str, tuple[bytes, list[bytes | bytearray]]] = {}
        self._session = KeptSession(timeout_s, session)

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

    def prepare(self, round_id: str, vector: npt.ArrayLike) -> list[bytes | bytearray]:
        """Encode and shard ``vector``: the upload body for each aggregator, in index order.

        With a secret, a deterministic function of (secret, topology, round, client,
        vector): the coins are drawn from the secret's stream for (round, client), the seeds
        derived for each aggregator and the SHA-256 of the encoded vector.
        """
        codec.check_id("round", round_id)
        m = self.topology.m
        full = full_share_index(self.client_id, m)
        d = int(np.shape(vector)[0]) if np.ndim(vector) == 1 else -1
        if d < 0:
            raise EncodingError(f"vector must be 1-dimensional, got shape {np.shape(vector)}")
        # The vector is encoded straight into the full share's upload body, and the seeds'
        # expansions are subtracted there: one vector-sized buffer, no copies.
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

    def submit(self, round_id: str, vector: npt.ArrayLike) -> SubmitReceipt:
        """Encode, share and upload ``vector`` to every aggregator (blocking).

        Raises :class:`~mpc_agg.errors.UploadRefused` when an aggregator refuses (a different
        vector already submitted for this round, wrong dimension, round not open, ...), and
        :class:`~mpc_agg.errors.AggregatorUnavailable` when one cannot be reached.
        """
        return run_sync(self.submit_async(round_id, vector), "submit")

    async def submit_async(self, round_id: str, vector: npt.ArrayLike) -> SubmitReceipt:
        """Asynchronous :meth:`submit`.

        Submitting the same vector to the same round again (say, after an aggregator was
        unreachable) resends the very same shares, so aggregators that already hold them
        answer "identical retry" and the others accept them: retries are idempotent. With a
        ``secret``, so does a new ``Client`` (after a crash, in another process).
        """
        # A fingerprint of the vector, not a copy of it: XXH3 at memory speed.
        key = xxhash.xxh3_128_digest(np.ascontiguousarray(vector, dtype=np.float64).data)
        cached = self._prepared.get(round_id)
        if cached is not None and cached[0] == key:
            bodies = cached[1]
        else:
            # O(d) numpy and AES work, off the event loop: other uploads keep flowing.
            bodies = await asyncio.to_thread(self.prepare, round_id, vector)
            self._prepared.clear()  # keep only the latest round's shares (O(d) memory)
            self._prepared[round_id] = (key, bodies)
        return await self.upload(round_id, bodies)

    async def upload(
        self,
        round_id: str,
        bodies: list[bytes | bytearray],
        aggregators: list[int] | None = None,
    ) -> SubmitReceipt:
        """Upload prepared ``bodies`` concurrently to ``aggregators`` (default: all)."""
        targets = list(range(self.topology.m)) if aggregators is None else aggregators
        path = f"/v1/rounds/{round_id}/shares/{self.client_id}"
        async with self._session() as session:
            apis = {
                i: AggregatorAPI(
                    session,
                    self.topology.aggregators[i],
                    token=self._tokens[i],
                    fingerprint=self.fingerprint,
                    retries=self.retries,
                    retry_budget_s=self.retry_budget_s,
                )
                for i in targets
            }
            outcomes = await asyncio.gather(
                *(apis[i].request("PUT", path, data=bodies[i]) for i in targets),
                return_exceptions=True,
            )
        accepted = tuple(i for i, o in zip(targets, outcomes, strict=True) if isinstance(o, tuple))
        for o in outcomes:
            if isinstance(o, TopologyMismatchError):
                raise o
        for o in outcomes:
            if isinstance(o, RemoteRefusal):
                raise UploadRefused(o.aggregator, o.status, o.code, o.detail, accepted=accepted)
        for o in outcomes:
            if isinstance(o, BaseException):  # AggregatorUnavailable, or a local bug
                raise o
        retries = tuple(
            i
            for i, o in zip(targets, outcomes, strict=True)
            if isinstance(o, tuple) and o[0] == 200
        )
        return SubmitReceipt(
            round_id, self.client_id, retries, sum(len(bodies[i]) for i in targets)
        )


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
