"""Typed, frozen topology objects. Built and validated once, by :mod:`mpc_agg.config.load`.

A topology names the aggregators (host, MPyC port, HTTP port), MPyC's Shamir threshold, the
round limits and the fixed-point encoding. Every cross-field check (honest majority, unique
ports, overflow headroom) runs in :func:`mpc_agg.config.load.build_topology`, before any
socket opens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from mpc_agg.core.encoding import FixedPointEncoding


@dataclass(frozen=True)
class AggregatorAddress:
    """Where aggregator ``index`` listens: MPyC party link and HTTP API."""

    index: int
    host: str
    mpc_port: int
    http_port: int
    scheme: str = "http"
    """``https`` when the topology configures TLS."""

    @property
    def url(self) -> str:
        """Base URL of this aggregator's HTTP API."""
        return f"{self.scheme}://{self.host}:{self.http_port}"


@dataclass(frozen=True)
class RoundPolicy:
    """Limits that apply to every round.

    ``min_clients``: fewest clients whose total may be revealed (a round may ask for more).
    ``max_clients``: most clients a round accepts; the overflow check assumes this many.
    ``max_dim``: largest vector length a round may be opened with.
    ``max_concurrent_uploads``: uploads in flight at one aggregator; more are answered 503.
    ``keep_results``: totals of ended rounds kept for the collector (8·d bytes each); older
    ones are dropped and their result answers 410 ``result_expired``.
    ``upload_buffer_mb``: MiB of upload bodies one aggregator holds in memory at once; an
    upload that does not fit waits for room (up to ``deadlines.upload_s``, then 503). It
    bounds an aggregator's memory whatever the number of clients; it must hold at least one
    FULL share of ``max_dim`` (``8 * max_dim`` bytes).
    """

    min_clients: int = 2
    max_clients: int = 10_000
    max_dim: int = 10_000_000
    max_concurrent_uploads: int = 256
    upload_buffer_mb: int = 128
    keep_results: int = 4

    @property
    def upload_buffer_bytes(self) -> int:
        """``upload_buffer_mb`` in bytes."""
        return self.upload_buffer_mb << 20


@dataclass(frozen=True)
class Deadlines:
    """Time limits, in seconds.

    ``step_s``: one exchange between aggregators (a party that does not answer in time is
    treated as lost: the round fails and the parties reconnect). ``upload_s``: receiving one
    request body. ``startup_s``: how long a launcher waits for all parties to connect.
    """

    step_s: float = 30.0
    upload_s: float = 120.0
    startup_s: float = 60.0


@dataclass(frozen=True)
class TlsSettings:
    """TLS on every link. ``dir`` holds the material of ``scripts/make_certs.py``: the CA,
    each aggregator's HTTPS certificate and MPyC's ``.config/`` for mutual TLS between
    parties (layout in :mod:`mpc_agg.transport.tls`)."""

    dir: Path


@dataclass(frozen=True)
class AuthSettings:
    """Bearer tokens. ``secrets_dir`` holds ``aggregator-{i}.key`` (aggregator i's HMAC key
    for client tokens) and ``collector.token`` (``scripts/make_secrets.py``)."""

    secrets_dir: Path


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy of every round's revealed total (the ``dp`` section).

    ``mechanism``: ``discrete_gaussian`` (each aggregator adds its own exactly drawn discrete
    Gaussian noise to its share before the reveal) or ``binomial`` (joint noise inside MPyC).
    ``epsilon``, ``delta``: the per-round target. ``l2_clip``: each client's vector is clipped
    to this L2 norm (float units) before encoding. ``max_colluding``: aggregators that may pool
    their knowledge of their own noise; the others' noise alone meets the target.
    ``budget_epsilon``, ``budget_delta``: the total over all rounds; a round that would exceed
    it is refused before any noise is added or anything revealed.
    """

    mechanism: str
    epsilon: float
    delta: float
    l2_clip: float
    max_colluding: int
    budget_epsilon: float
    budget_delta: float


@dataclass(frozen=True)
class Topology:
    """A validated aggregator topology. Load one with :meth:`Topology.load`.

    ``threshold`` is MPyC's Shamir threshold ``t`` (``2t < m``); ``m`` is the number of
    aggregators; aggregator 0 is the leader. ``data_dir`` holds each aggregator's journals.
    """

    name: str
    aggregators: tuple[AggregatorAddress, ...]
    threshold: int
    rounds: RoundPolicy
    encoding: FixedPointEncoding
    data_dir: Path
    fsync: bool = True
    deadlines: Deadlines = Deadlines()
    tls: TlsSettings | None = None
    auth: AuthSettings | None = None
    dp: DPSettings | None = None
    source: str | None = None

    @property
    def m(self) -> int:
        """Number of aggregators."""
        return len(self.aggregators)

    @property
    def leader(self) -> AggregatorAddress:
        """Aggregator 0, which decides when rounds close."""
        return self.aggregators[0]

    @property
    def secure_arrays_available(self) -> bool:
        """True when MPyC's Shamir sharing hides values from a single party (``t >= 1``).

        With ``m = 2`` the threshold must be 0 and a "secret-shared" value is plain to both
        parties; only the additive path (sums of client shares) is private then.
        """
        return self.threshold >= 1

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        """Load and validate a YAML topology; raises :class:`~mpc_agg.errors.ConfigError`."""
        from mpc_agg.config.load import load_topology

        return load_topology(path)

    @classmethod
    def from_dict(cls, data: object, source: str = "<dict>") -> Topology:
        """Validate an already-parsed YAML document (a dict)."""
        from mpc_agg.config.load import build_topology

        return build_topology(data, source=source)

    def with_absolute_paths(self) -> Topology:
        """The same topology with its directories resolved against the current directory
        (a party does this before it changes directory for MPyC)."""
        return replace(
            self,
            data_dir=self.data_dir.resolve(),
            tls=TlsSettings(self.tls.dir.resolve()) if self.tls else None,
            auth=AuthSettings(self.auth.secrets_dir.resolve()) if self.auth else None,
        )

    def ledger_path(self, index: int) -> Path:
        """Aggregator ``index``'s privacy ledger (rounds' privacy cost, append-only)."""
        return self.aggregator_dir(index) / "privacy-ledger.jsonl"

    def aggregator_dir(self, index: int) -> Path:
        """The journal directory of aggregator ``index``."""
        return self.data_dir / f"aggregator-{index}"
