"""The ``shard`` step with the full share's upload body built block by block, in flat memory.

docs/design.md, "Cryptographic core" (additive sharing with seed compression, client
secrets). :func:`shard_streamed` gives the very bytes of
:func:`~mpc_agg.core.sharing.shard_in_place` followed by
:func:`~mpc_agg.core.codec.full_share_body` for the same coins and seeds, but holds only
O(block) memory (a *check* block: whole blocks, at least 65,536 values) besides the
caller's input vector and 32 bytes per check block, so a client can send a share of
``d = 1e8 .. 1e9`` coordinates as it is produced. Everything random is settled before the
first byte of any body exists:

1. the L2 clip factor, if the encoding has an ``l2_clip``
   (:meth:`~mpc_agg.core.encoding.FixedPointEncoding.l2_factor`, one pass over the input);
2. the SHA-256 of the encoded vector, which the seeds are bound to
   (:func:`~mpc_agg.core.xof.vector_digest`): one pass encoding block by block with the
   coins, hashing and discarding each block, and keeping the SHA-256 of each prefix of
   the encoded vector that ends at a *check* block's end (32 bytes per check block of
   at least 65,536 values: 244 KB at ``d = 1e9`` in GF(p) with 1 MiB blocks);
3. the ``m - 1`` seeds, ``seed_for(aggregator, attempt, digest)``; in a ring whose words
   can be rejected (GF(p): the word p), each seed's stream is read once over its first
   ``d`` words, and a seed whose stream holds the rejected word is replaced by attempt + 1,
   as :func:`~mpc_agg.core.sharing.shard_in_place` does (one AES pass per seed in GF(p),
   none in Z_(2^32)).

:meth:`StreamedShard.chunks` then yields the header and one block after another: the
block encoded again with a fresh coin stream, minus each seed's expansion of the block's
coordinates. Each call starts over and yields identical bytes, which is what an upload
retry needs. The core does no I/O: the caller sends the chunks.

The body is made from the caller's vector again at every call, with the seeds settled
once. Were the vector changed in between (a view of a tensor that training updates, a
memory map), a retry would send ``enc(x') - S`` with the same seeds ``S`` as the cut
attempt's ``enc(x) - S``, and the full share's aggregator would learn ``enc(x) - enc(x')``.
So each check block is encoded, and the SHA-256 of the prefix it ends checked against the
one kept in step 2, before any of its bytes exist minus a seed stream: a changed block
raises :class:`VectorChanged`, and what was yielded before it is what the first call
yielded, byte for byte.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mpc_agg.core import codec, field
from mpc_agg.core.encoding import FixedPointEncoding, UniformSource
from mpc_agg.core.ring import Ring, RingArray
from mpc_agg.core.sharing import Share, ShareKind, full_share_index
from mpc_agg.core.xof import share_context
from mpc_agg.errors import EncodingError, VectorChanged

DEFAULT_BLOCK_BYTES = 1 << 20
"""Bytes of share values per chunk of a streamed body (1 MiB: 131,072 GF(p) coordinates)."""


SeedSource = Callable[[int, int, bytes], bytes]
"""``seed_for(aggregator, attempt, vector_digest)``: the 16-byte seed of ``aggregator``'s
share at ``attempt`` 0, 1, ... of the encoded vector whose SHA-256 is ``vector_digest``; a
PRF of its arguments (e.g. :meth:`~mpc_agg.core.xof.ClientSecret.seed`)."""


def _rejects_words(ring: Ring) -> bool:
    """True when some word of a seed's stream is not an element (GF(p): the word p), so
    a stream must be read to know whether its seed is kept. A ring of ``2**(8 * itemsize)``
    elements takes every word as it comes."""
    return ring.modulus < 1 << (8 * ring.itemsize)


@dataclass(frozen=True, repr=False, eq=False)
class StreamedShard:
    """A client's shares of one vector: ``seed_shares`` (tiny, whole) and the full share as
    an upload body produced block by block (:meth:`chunks`).

    Holds a reference to the caller's ``x``, not a copy, and reads it again at every
    :meth:`chunks`: ``x`` must not change while the body may still be made, and if it does,
    :meth:`chunks` raises :class:`VectorChanged` before the first changed block. ``check``
    (a multiple of ``block``) is the number of values per check block, ``prefixes`` the
    SHA-256 of the encoded vector's first ``check * (k + 1)`` values (or all of them), for
    each check block ``k``. The repr shows sizes only.
    """

    x: npt.NDArray[Any]
    encoding: FixedPointEncoding
    round_id: str
    client_id: str
    full_index: int
    seed_shares: tuple[Share, ...]
    factor: float | None
    coins: Callable[[], UniformSource]
    block: int
    check: int
    prefixes: tuple[bytes, ...]

    def __repr__(self) -> str:
        return (
            f"StreamedShard(full share for aggregator {self.full_index}, {self.dim} elements "
            f"of {self.ring.name}, {len(self.seed_shares)} seed shares)"
        )

    @property
    def dim(self) -> int:
        """Coordinates of the vector."""
        return int(self.x.shape[0])

    @property
    def ring(self) -> Ring:
        """The ring of the share values."""
        return self.encoding.ring

    @property
    def length(self) -> int:
        """Bytes of the full share's upload body (its ``Content-Length``)."""
        return codec.share_body_length(ShareKind.FULL, self.dim, self.ring)

    def seed_bodies(self) -> dict[int, bytes]:
        """The upload body of each seed share, by aggregator index."""
        return {s.aggregator: bytes(codec.encode_share(s)) for s in self.seed_shares}

    def chunks(self) -> Iterator[bytes]:
        """The full share's upload body: the header, then blocks of at most ``block``
        values (the last one shorter), from the start at every call, identical each time.

        Per check block: encode it with the next coins of a fresh coin stream, check the
        SHA-256 of the encoded prefix it ends (:class:`VectorChanged` if it is not the one
        the seeds were settled with), subtract every seed's expansion of the same
        coordinates, reduce to canonical, yield its wire bytes a block at a time. Memory:
        one check block of values, one of each seed's stream, the encoder's scratch.
        """
        ring, d, check = self.ring, self.dim, self.check
        yield codec.full_share_header(self.full_index, d, ring)
        coins = self.coins()
        streams = []
        for share in self.seed_shares:
            assert share.seed is not None  # a SEED share always carries its seed
            context = share_context(self.round_id, self.client_id, share.aggregator)
            streams.append(ring.blocks(share.seed, context, min(d, check)))
        acc = ring.empty(min(d, check))
        last = len(streams) - 1
        h = hashlib.sha256()
        for k, start in enumerate(range(0, d, check)):
            stop = min(start + check, d)
            a = acc[: stop - start]
            self.encoding.encode_block(self.x[start:stop], coins, self.factor, a, start=start)
            # Checked before a seed stream touches the block: a retry sends nothing that
            # differs from what an earlier attempt may have sent under the same seeds.
            h.update(_le_bytes(ring, a))
            if h.copy().digest() != self.prefixes[k]:
                raise VectorChanged(start)
            for n, stream in enumerate(streams):
                words = stream.next_block(stop - start)
                if words is None:  # the seed's stream was read in full when it was chosen
                    raise RuntimeError(
                        f"the stream of seed share {self.seed_shares[n].aggregator} changed "
                        f"at coordinate {start}: seeds are settled before the body is made"
                    )
                ring.lazy_neg(words, out=words)  # congruent to -v, <= modulus
                a += words
                if n == last:
                    ring.canonical(a, out=a)
                else:
                    ring.reduce(a, out=a)
            for i in range(0, stop - start, self.block):
                yield ring.to_wire(a[i : i + self.block])


def _le_bytes(ring: Ring, a: RingArray) -> Any:
    """The little-endian bytes of ``a`` (a view where the machine is little-endian)."""
    return a.data if sys.byteorder == "little" else ring.to_wire(a)


def _encoded_blocks(
    x: npt.NDArray[Any],
    encoding: FixedPointEncoding,
    factor: float | None,
    coins: UniformSource,
    block: int,
) -> Iterator[RingArray]:
    """The encoding of ``x``, ``block`` coordinates at a time, in one reused buffer."""
    d = int(x.shape[0])
    out = encoding.ring.empty(min(d, block))
    for start in range(0, d, block):
        stop = min(start + block, d)
        yield encoding.encode_block(x[start:stop], coins, factor, out[: stop - start], start=start)


def _stream_kept(ring: Ring, seed: bytes, context: bytes, d: int, block: int) -> bool:
    """True when the first ``d`` words of ``seed``'s stream are all elements of ``ring``."""
    stream = ring.blocks(seed, context, min(d, block))
    for start in range(0, d, block):
        if stream.next_block(min(block, d - start)) is None:
            return False
    return True


def shard_streamed(
    x: npt.ArrayLike,
    encoding: FixedPointEncoding,
    round_id: str,
    client_id: str,
    m: int,
    *,
    coins: Callable[[], UniformSource],
    seed_for: SeedSource,
    full_index: int | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> StreamedShard:
    """Settle the shares of ``x`` (1-D, real, finite) for ``m`` aggregators, for sending
    the full share block by block (module docstring).

    ``coins()`` returns a *fresh* source of rounding coins from its start (e.g.
    ``functools.partial(secret.coins, fingerprint, round_id, client_id)``); it is called
    once here and once per :meth:`StreamedShard.chunks`. ``seed_for`` gives the seeds
    (:data:`SeedSource`). ``full_index`` overrides :func:`full_share_index`; ``block_bytes``
    (at least one value) sets the chunk size. For the same coins and seeds,
    ``b"".join(chunks())`` equals the full share's body from
    :func:`~mpc_agg.core.sharing.shard_in_place` and the seed shares are equal too.
    Raises :class:`~mpc_agg.errors.EncodingError` for a vector that cannot be encoded,
    before anything is returned. Costs two or three passes over ``x`` (module docstring).
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise EncodingError(f"vector must be 1-dimensional, got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise EncodingError(f"vector must hold real numbers, got dtype {x.dtype}")
    if m < 2:
        raise ValueError(f"sharing needs m >= 2 aggregators, got {m}")
    full = full_share_index(client_id, m) if full_index is None else full_index
    if not 0 <= full < m:
        raise ValueError(f"full_index must be in 0..{m - 1}, got {full}")
    ring = encoding.ring
    if block_bytes < ring.itemsize:
        raise ValueError(f"block_bytes must be at least {ring.itemsize}, got {block_bytes}")
    d = int(x.shape[0])
    if d > codec.MAX_DIM:
        raise EncodingError(f"vector has {d} coordinates, more than {codec.MAX_DIM}")
    block = block_bytes // ring.itemsize
    # The passes below give the same result for any block size: a large one costs fewer
    # Python steps, and is still O(1) memory (512 KiB of GF(p) values). The check block,
    # the unit chunks() verifies before sending any of it, is that pass block rounded up
    # to whole chunks: 32 bytes of prefix digest per 65,536 values at least.
    check = block * -(-field.BLOCK // block)
    factor = encoding.l2_factor(x)
    h = hashlib.sha256()
    prefixes = []
    for encoded in _encoded_blocks(x, encoding, factor, coins(), check):
        h.update(_le_bytes(ring, encoded))
        prefixes.append(h.copy().digest())
    digest = h.digest()  # == vector_digest(encoding.encode(x, coins()))
    rejects = _rejects_words(ring)
    seeds = []
    for j in range(m):
        if j == full:
            continue
        context = share_context(round_id, client_id, j)
        attempt = 0
        while True:
            seed = seed_for(j, attempt, digest)
            attempt += 1
            if not rejects or _stream_kept(ring, seed, context, d, check):
                break
        seeds.append(Share(j, ShareKind.SEED, d, seed=seed, ring=ring))
    return StreamedShard(
        x,
        encoding,
        round_id,
        client_id,
        full,
        tuple(seeds),
        factor,
        coins,
        block,
        check,
        tuple(prefixes),
    )
