"""Fixed-point encoding of float vectors into a ring (GF(p) or Z_(2^32)), and back.

docs/design.md, "Cryptographic core" (fixed-point encoding): clip (L2 norm and/or per-coordinate
bound), scale by
``2**frac_bits``, round to an integer *at random* so that the rounding is unbiased
(``E[round(y)] = y``), embed in the ring two's-complement style (:mod:`mpc_agg.core.ring`).
Decoding takes the centered lift (values above the ring's half back to negatives) and
divides by ``2**frac_bits``.

The silent wrap-around of a sum past the ring's half (p/2, or 2^31 in Z_(2^32)) would be
the worst bug of this system, so :meth:`FixedPointEncoding.check_headroom` proves up front
that ``max_clients`` encoded vectors (plus a noise tail) stay below it in absolute value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from mpc_agg.core import field
from mpc_agg.core.ring import GF_P61, Ring, RingArray
from mpc_agg.errors import ConfigError, EncodingError

MAX_FRAC_BITS = 40


class UniformSource(Protocol):
    """Where rounding coins come from: ``np.random.Generator`` or
    :class:`~mpc_agg.core.xof.CoinStream` (uniform doubles in [0, 1))."""

    def random(self, size: int) -> npt.NDArray[np.float64]: ...


_FLOAT_EXACT = 2**52  # integers up to 2**53 are exact in float64; keep a bit of margin


def _check_finite(x: npt.NDArray[Any], start: int = 0) -> None:
    """Raise :class:`EncodingError` naming the first non-finite value of ``x`` (real
    dtype), at its index in the whole vector (``x[0]`` being coordinate ``start``)."""
    if x.dtype.kind not in "biuf":
        raise EncodingError(f"vector must hold real numbers, got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise EncodingError(f"vector has a non-finite value {x[bad]} at index {start + bad}")


@dataclass(frozen=True)
class FixedPointEncoding:
    """How floats become ring elements.

    ``frac_bits``: fractional bits, 0..40; resolution ``2**-frac_bits``.
    ``coord_clip``: each coordinate is clipped to ``[-coord_clip, coord_clip]`` (optional).
    ``l2_clip``: the vector is scaled down to L2 norm ``<= l2_clip`` (optional).
    At least one clip must be set: without a bound no overflow check is possible.
    ``ring``: :data:`~mpc_agg.core.ring.GF_P61` (8-byte elements, the default) or
    :data:`~mpc_agg.core.ring.Z2_32` (4-byte elements; sums must stay below 2^31).
    """

    frac_bits: int = 24
    coord_clip: float | None = 1000.0
    l2_clip: float | None = None
    ring: Ring = GF_P61

    def __post_init__(self) -> None:
        if not isinstance(self.ring, Ring):
            raise ConfigError("encoding.ring", f"expected gf_p61 or z2_32, got {self.ring!r}")
        if not isinstance(self.frac_bits, int) or not 0 <= self.frac_bits <= MAX_FRAC_BITS:
            raise ConfigError(
                "encoding.frac_bits",
                f"must be an integer in 0..{MAX_FRAC_BITS}, got {self.frac_bits!r}",
            )
        for name in ("coord_clip", "l2_clip"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"encoding.{name}", f"must be a positive finite number, got {v!r}"
                )
        if self.coord_clip is None and self.l2_clip is None:
            raise ConfigError(
                "encoding",
                "set coord_clip and/or l2_clip: without a bound on each value, no overflow "
                "check against max_clients is possible",
            )
        if self.max_abs_coordinate * 2.0**self.frac_bits >= _FLOAT_EXACT:
            raise ConfigError(
                "encoding.frac_bits",
                f"clip bound {self.max_abs_coordinate} x 2**{self.frac_bits} reaches 2**52: "
                "float64 could no longer round exactly; lower frac_bits or the clip",
            )

    @property
    def scale(self) -> float:
        """``2**frac_bits``: encoded units per float unit."""
        return float(2**self.frac_bits)

    @property
    def max_abs_coordinate(self) -> float:
        """The largest absolute value of one coordinate after clipping (float units)."""
        bounds = [b for b in (self.coord_clip, self.l2_clip) if b is not None]
        return float(min(bounds))

    @property
    def max_abs_encoded(self) -> int:
        """The largest absolute value of one encoded coordinate (integer units).

        Clipping bounds ``|x| <= b``, so ``|x * 2**f| <= b * 2**f`` and randomized rounding
        moves it by less than one unit: ``|v| <= ceil(b * 2**f)``.
        """
        return math.ceil(self.max_abs_coordinate * self.scale)

    def check_headroom(
        self, max_clients: int, noise_tail: int = 0, path: str = "rounds.max_clients"
    ) -> None:
        """Raise :class:`ConfigError` unless ``max_clients`` vectors plus ``noise_tail``
        (integer units) always sum to less than the ring's :attr:`~Ring.limit` (p/2, or
        2^31 in Z_(2^32)) in absolute value, so the centered lift recovers the sum."""
        worst = max_clients * self.max_abs_encoded + noise_tail
        if worst >= self.ring.limit:
            hint = "" if self.ring is GF_P61 else ", or use encoding.ring gf_p61"
            raise ConfigError(
                path,
                f"{max_clients} clients x max |value| {self.max_abs_coordinate}"
                f" x 2**{self.frac_bits} (+ noise tail {noise_tail}) = {worst:.3e}"
                f" can reach {self.ring.limit_text}"
                + ("" if self.ring is GF_P61 else f" (encoding.ring {self.ring.name})")
                + ": the sum would wrap around silently; lower max_clients, the clip or "
                f"frac_bits{hint}",
            )

    def clip(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Validate ``x`` (1-D, finite) and clip it: L2 norm first, then per coordinate."""
        x = np.array(x, dtype=np.float64, copy=True)
        if x.ndim != 1:
            raise EncodingError(f"vector must be 1-dimensional, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            bad = int(np.flatnonzero(~np.isfinite(x))[0])
            raise EncodingError(f"vector has a non-finite value {x[bad]} at index {bad}")
        factor = self.l2_factor(x)
        if factor is not None:
            x *= factor
        # The L2 scaling may overshoot by one ulp; clipping every coordinate to the bound the
        # overflow check uses makes ``|x_i| <= max_abs_coordinate`` exact.
        bound = self.max_abs_coordinate
        np.clip(x, -bound, bound, out=x)
        return x

    def encode(
        self, x: npt.ArrayLike, rng: UniformSource, out: RingArray | None = None
    ) -> RingArray:
        """Clip, scale and round ``x`` at random (unbiased); canonical ring vector.

        ``rng`` supplies the rounding coins; pass a generator seeded from the OS CSPRNG
        (``np.random.default_rng()``) or a client secret's
        :class:`~mpc_agg.core.xof.CoinStream` outside tests. ``out`` (the ring's dtype, length
        ``len(x)``) receives the result, e.g. the payload of an upload body. Works in blocks of
        :data:`~mpc_agg.core.field.BLOCK` elements, in cache, with the same floating-point
        operations and coins as :meth:`clip` followed by rounding of the whole vector; equal
        to :meth:`l2_factor` then :meth:`encode_block` over consecutive blocks of any sizes.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1:
            raise EncodingError(f"vector must be 1-dimensional, got shape {x.shape}")
        _check_finite(x)
        d = x.shape[0]
        if out is None:
            out = self.ring.empty(d)
        else:
            self._check_out(out, d)
        return self._encode_into(x, rng, self.l2_factor(x), out)

    def encode_block(
        self,
        x: npt.NDArray[np.floating[Any] | np.integer[Any]],
        coins: UniformSource,
        factor: float | None,
        out: RingArray,
        *,
        start: int = 0,
    ) -> RingArray:
        """Encode one block ``x`` of a vector into ``out`` (the ring's dtype, ``len(x)``).

        ``factor`` is :meth:`l2_factor` of the *whole* vector; ``coins`` gives exactly
        ``len(x)`` coins, those of this block's coordinates. ``x`` may be of any real dtype
        (converted to float64 block by block, exactly). ``start``, the index of ``x[0]`` in
        the vector, only names the coordinate of a non-finite value in the error. Blocks
        encoded one after another with one coin stream give the bytes of :meth:`encode`.
        """
        x = np.asarray(x)
        if x.ndim != 1:
            raise EncodingError(f"vector must be 1-dimensional, got shape {x.shape}")
        _check_finite(x, start)
        self._check_out(out, x.shape[0])
        return self._encode_into(x, coins, factor, out)

    def _check_out(self, out: RingArray, d: int) -> None:
        if out.shape != (d,) or out.dtype != self.ring.dtype:
            raise ValueError(
                f"out must be {np.dtype(self.ring.dtype)} of shape ({d},), got {out.dtype} "
                f"{out.shape}"
            )

    def _encode_into(
        self,
        x: npt.NDArray[Any],
        rng: UniformSource,
        factor: float | None,
        out: RingArray,
    ) -> RingArray:
        """The loop of :meth:`encode` for checked, finite, real 1-D ``x``."""
        d = x.shape[0]
        bound, scale = self.max_abs_coordinate, self.scale
        y = np.empty(min(d, field.BLOCK), dtype=np.float64)
        v = np.empty(min(d, field.BLOCK), dtype=np.int64)
        for start in range(0, d, field.BLOCK):
            stop = min(start + field.BLOCK, d)
            yb, vb = y[: stop - start], v[: stop - start]
            if factor is None:
                yb[:] = x[start:stop]  # exact for any real dtype (float32 widens exactly)
            else:
                # In float64 whatever x's dtype (a float32 block times a Python float would
                # otherwise be computed in float32).
                np.multiply(x[start:stop], factor, out=yb, dtype=np.float64)
            np.clip(yb, -bound, bound, out=yb)
            yb *= scale
            np.floor(yb, out=vb, casting="unsafe")  # exact: |y| < 2**52
            np.subtract(yb, vb, out=yb)  # the fractional part, in [0, 1)
            vb += np.less(rng.random(stop - start), yb)  # up with probability frac
            self.ring.from_signed(vb, out=out[start:stop])
        return out

    def l2_factor(self, x: npt.ArrayLike) -> float | None:
        """The factor that brings ``x``'s L2 norm under ``l2_clip``, or None if it is under
        (or no ``l2_clip`` is set).

        Two passes over ``x`` in blocks of :data:`~mpc_agg.core.field.BLOCK` elements, with
        block-sized temporaries only (``x`` may be of any real dtype, e.g. a float32 model):
        the peak ``max |x_i|``, then ``sum (x_i / peak)**2`` as numpy's pairwise sum within
        each block and an exactly rounded sum (``math.fsum``) of the block sums. The result
        depends on ``x`` alone, not on BLAS or its thread count (a BLAS dot product does: its
        threads split the vector differently), so a client secret's resubmission reproduces
        it on any machine; it may differ by an ulp from ``np.linalg.norm``.
        Raises :class:`EncodingError` for a non-finite value.
        """
        x = np.asarray(x)
        if x.ndim != 1:
            raise EncodingError(f"vector must be 1-dimensional, got shape {x.shape}")
        if self.l2_clip is None or not x.size:
            return None
        d = x.shape[0]
        peak = 0.0
        for start in range(0, d, field.BLOCK):
            block = x[start : start + field.BLOCK]
            _check_finite(block, start)
            peak = max(peak, float(np.max(np.abs(block))))
        if peak == 0.0:
            return None
        # Norm of x / peak, times peak: no overflow for finite entries near 1e308.
        q = np.empty(min(d, field.BLOCK), dtype=np.float64)
        sums = []
        for start in range(0, d, field.BLOCK):
            stop = min(start + field.BLOCK, d)
            qb = q[: stop - start]
            np.divide(x[start:stop], peak, out=qb, dtype=np.float64)
            np.multiply(qb, qb, out=qb)
            sums.append(float(np.add.reduce(qb)))
        norm = peak * math.sqrt(math.fsum(sums))
        if norm <= self.l2_clip:
            return None
        # A hair under l2_clip / norm, so float rounding cannot leave the norm above the
        # clip that the DP noise is calibrated to.
        return (self.l2_clip / norm) * (1.0 - 2.0**-50)

    def decode(self, v: RingArray) -> npt.NDArray[np.float64]:
        """Ring vector (a client's encoding or a sum of them) back to floats (centered
        lift); ``v`` must have the ring's dtype."""
        v = np.asarray(v)
        if v.dtype != self.ring.dtype:
            raise EncodingError(
                f"a {self.ring.name} vector has dtype {np.dtype(self.ring.dtype)}, got {v.dtype}"
            )
        return self.ring.to_signed(v).astype(np.float64) / self.scale
