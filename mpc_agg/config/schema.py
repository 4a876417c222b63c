"""Typed, frozen topology objects that validate themselves; a YAML topology is read into them.

docs/design.md, "Layout" (``config/``) and "Differential privacy"; README, "Topology files"
and "Differential privacy". A topology names the aggregators (host, MPyC port, HTTP port),
MPyC's Shamir threshold, the round limits, the fixed-point encoding and, optionally,
deadlines, TLS, tokens and differential privacy.

Every object checks its own values in ``__post_init__``, built from YAML or in code alike,
and raises :class:`~mpc_agg.errors.ConfigError` naming the YAML path of the offending value
(``RoundPolicy(min_clients=0)`` fails at ``rounds.min_clients``). :class:`Topology` adds the
checks that span sections (honest majority, unique ports, the ``dp`` section against the
number of aggregators, overflow headroom including the noise), before any socket opens.
:meth:`Topology.load` and :meth:`Topology.from_dict` read a document into these
constructors with the generic helpers of :mod:`mpc_agg.config.load`; the keys a section may
hold are its dataclass's fields.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mpc_agg.config.load import YAML, Section, expect, read_document, yaml_keys
from mpc_agg.core.codec import MAX_DIM, SHARE_HEADER, share_body_length
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.ring import GF_P61, ring_named
from mpc_agg.core.sharing import ShareKind
from mpc_agg.dp.planning import Mechanism as Mechanism
from mpc_agg.dp.planning import plan_noise
from mpc_agg.errors import ConfigError

MAX_AGGREGATORS = 16
_LOOPBACK = "127.0.0.1"
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "localhost.localdomain", "::1", "ip6-localhost"}
_MAX_DEADLINE_S = 86400
_MAX_OPEN_S = 30 * 86400

STREAM_ABOVE_MB = 16.0
"""Default of an aggregator's streaming threshold (``mpc-agg party --stream-above-mb``, a
party-local setting, not in the topology): a round whose vectors take more than this many
MiB (``d`` times the ring's element size) is *large*: its full shares are received block by
block into a spool file, never held whole (docs/design.md, "Streamed uploads")."""

MAX_STREAM_ABOVE_MB = 1024.0
"""Highest streaming threshold: a body taken whole is journaled as one record, which must
stay below the journal's 2 GiB record limit."""

STREAM_BLOCK_BYTES = 1 << 20
"""Bytes of a streamed body held at a time (a multiple of every ring's element size): what
a streamed upload takes of the upload buffer."""


def _positive(value: object, path: str, upper: float = math.inf) -> float:
    """``value`` as a float in ``(0, upper)``, finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {value!r}")
    if not (0 < value < upper and math.isfinite(value)):
        bound = f"in (0, {upper:g})" if math.isfinite(upper) else "positive and finite"
        raise ConfigError(path, f"must be {bound}, got {value!r}")
    return float(value)


def _directory(value: object, path: str) -> Path:
    """A directory given as a ``Path`` or (from YAML) a ``str``."""
    return value if isinstance(value, Path) else Path(expect(value, str, path))


def check_host(value: object, path: str) -> str:
    """``value`` as a host: a DNS name, an IPv4 address or an IPv6 literal (without
    brackets; kept in its compressed, lowercase form, so ``0:0::1`` and ``::1`` are one
    host). Raises :class:`ConfigError` at ``path`` otherwise."""
    host = expect(value, str, path)
    if host.startswith("[") and host.endswith("]"):
        raise ConfigError(path, f"write an IPv6 address without brackets, got {host!r}")
    if ":" in host:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is None:
            return address.compressed
        raise ConfigError(path, f"not a host name, IPv4 or IPv6 address: {host!r}")
    if not host or any(c.isspace() or c in "/@[]%" for c in host):
        raise ConfigError(path, f"not a host name, IPv4 or IPv6 address: {host!r}")
    return host


def host_port(host: str, port: int) -> str:
    """``host:port`` as in a URL: an IPv6 literal in brackets (``[::1]:8701``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` names and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AggregatorAddress:
    """Aggregator ``index`` (``aggregators[i]``): where it listens (MPyC party link, HTTP API)
    and its public keys.

    ``host`` is where the others reach it: a DNS name, an IPv4 address or an IPv6 literal
    (no brackets; quote it in YAML, ``host: "::1"``). It is also where the party listens
    unless its own settings name a bind address (README, "Running aggregators").
    ``party_cert``: PEM of the self-signed certificate it presents on party links (pinned:
    peers accept exactly this one for index ``i``). ``http_cert``: PEM of its HTTPS
    certificate (pinned by clients and the collector). ``signing_key``: hex of its raw
    32-byte Ed25519 public key, which verifies its result statements. All three are public;
    a topology without them is a *template* that ``mpc_agg.provision`` (the local launcher
    and the demo) fills in with throw-away keys. README, "Security model".
    """

    index: int = field(metadata={YAML: None})
    host: str
    mpc_port: int
    http_port: int
    scheme: str = field(default="https", metadata={YAML: None})
    """``http`` only when the topology is ``insecure``."""
    party_cert: str | None = None
    http_cert: str | None = None
    signing_key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ConfigError("aggregators", f"index must be an integer >= 0, got {self.index!r}")
        p = f"aggregators[{self.index}]"
        object.__setattr__(self, "host", check_host(self.host, f"{p}.host"))
        for key in ("mpc_port", "http_port"):
            port = expect(getattr(self, key), int, f"{p}.{key}")
            if not 1 <= port <= 65535:
                raise ConfigError(f"{p}.{key}", f"port must be in 1..65535, got {port}")
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"{p}.scheme", f"expected http or https, got {self.scheme!r}")
        for key in ("party_cert", "http_cert"):
            pem = getattr(self, key)
            if pem is not None and not (
                isinstance(pem, str) and pem.lstrip().startswith("-----BEGIN CERTIFICATE-----")
            ):
                raise ConfigError(
                    f"{p}.{key}", "expected a PEM certificate (-----BEGIN CERTIFICATE-----)"
                )
        key_hex = self.signing_key
        if key_hex is not None and not (
            isinstance(key_hex, str)
            and len(key_hex) == 64
            and all(c in "0123456789abcdef" for c in key_hex)
        ):
            raise ConfigError(
                f"{p}.signing_key", "expected 64 lowercase hex characters (an Ed25519 public key)"
            )

    @property
    def url(self) -> str:
        """Base URL of this aggregator's HTTP API (an IPv6 host in brackets)."""
        return f"{self.scheme}://{host_port(self.host, self.http_port)}"

    @property
    def has_keys(self) -> bool:
        """True when all three public keys are present (not a template entry)."""
        return None not in (self.party_cert, self.http_cert, self.signing_key)


def stream_above_bytes(mb: float) -> int:
    """A streaming threshold of ``mb`` MiB in bytes."""
    return int(mb * 2**20)


def whole_body_bytes(max_dim: int, stream_above_mb: float = STREAM_ABOVE_MB) -> int:
    """The largest upload body an aggregator takes whole (and so holds in its upload buffer
    at once) with vectors of up to ``max_dim`` coordinates and the streaming threshold
    ``stream_above_mb``: a full share of ``max_dim`` (8-byte coordinates, the widest ring),
    or of the threshold if that is smaller; at least one streamed block."""
    full = share_body_length(ShareKind.FULL, max_dim)
    threshold = stream_above_bytes(stream_above_mb) + SHARE_HEADER.size
    return min(full, max(threshold, STREAM_BLOCK_BYTES))


@dataclass(frozen=True)
class RoundPolicy:
    """Limits that apply to every round (the ``rounds`` section).

    ``min_clients``: fewest clients whose total may be revealed (a round may ask for more).
    ``max_clients``: most clients a round accepts; the overflow check assumes this many.
    ``max_dim``: largest vector length a round may be opened with.
    ``max_concurrent_uploads``: uploads in flight at one aggregator; more are answered 503.
    ``keep_results``: totals of ended rounds kept for the collector (8·d bytes each); older
    ones are dropped and their result answers 410 ``result_expired``.
    ``upload_buffer_mb``: MiB of upload bodies one aggregator holds in memory at once; an
    upload that does not fit waits for room (up to ``deadlines.upload_s``, then 503). It
    bounds an aggregator's memory whatever the number of clients. It must hold the largest
    body taken whole: a FULL share of ``max_dim`` (``8 * max_dim`` bytes plus the header),
    or, when that is above the default streaming threshold (:data:`STREAM_ABOVE_MB`), a
    share at that threshold; larger full shares are streamed and hold one block
    (:data:`STREAM_BLOCK_BYTES`) at a time. ``max_dim`` may be up to ``2**32 - 1``.
    ``max_open``: live rounds (open, closing or aggregating) one aggregator holds at once;
    opening one more is refused (429 ``too_many_rounds``). Each round that has received an
    upload holds its running sum (``8 * dim`` bytes), so this also bounds that memory
    (``max_open * 8 * max_dim`` at most). A restart that finds more open rounds than this
    keeps the ``max_open`` opened earliest and fails the others, nothing revealed.
    ``max_open_s``: seconds a round may stay open (default one day, at most 30 days): past
    it, the round fails at every aggregator with nothing revealed (failure ``expired``)
    and its journal is deleted; the id stays used. A deadline to be *closed*: an
    aggregation that has started is bounded by ``deadlines.step_s`` instead. It is a
    garbage collector for rounds nobody closes, not a latency target, so the default
    leaves room for collection windows of hours; ``max_open`` is what bounds resources.
    """

    min_clients: int = 2
    max_clients: int = 10_000
    max_dim: int = 10_000_000
    max_concurrent_uploads: int = 256
    upload_buffer_mb: int = 128
    keep_results: int = 4
    max_open: int = 64
    max_open_s: float = 86_400.0

    def __post_init__(self) -> None:
        for key in yaml_keys(RoundPolicy):
            if key != "max_open_s":
                expect(getattr(self, key), int, f"rounds.{key}")
        value = self.max_open_s
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value <= _MAX_OPEN_S
        ):
            raise ConfigError(
                "rounds.max_open_s", f"expected seconds in (0, {_MAX_OPEN_S}], got {value!r}"
            )
        object.__setattr__(self, "max_open_s", float(value))
        if self.max_open < 1:
            raise ConfigError("rounds.max_open", f"must be >= 1, got {self.max_open}")
        if self.min_clients < 2:
            raise ConfigError(
                "rounds.min_clients",
                f"must be >= 2, got {self.min_clients}: the total of one client is that "
                "client's vector",
            )
        if self.max_clients < self.min_clients:
            raise ConfigError(
                "rounds.max_clients",
                f"{self.max_clients} is below min_clients = {self.min_clients}",
            )
        if not 1 <= self.max_dim <= MAX_DIM:
            raise ConfigError("rounds.max_dim", f"must be in 1..{MAX_DIM}, got {self.max_dim}")
        if self.max_concurrent_uploads < 1:
            raise ConfigError(
                "rounds.max_concurrent_uploads", f"must be >= 1, got {self.max_concurrent_uploads}"
            )
        largest_body = whole_body_bytes(self.max_dim)
        if self.upload_buffer_bytes < largest_body:
            streamed = largest_body < share_body_length(ShareKind.FULL, self.max_dim)
            what = (
                f"a full share at the streaming threshold of {STREAM_ABOVE_MB:g} MiB (larger "
                "ones are streamed)"
                if streamed
                else f"one full share of max_dim = {self.max_dim}"
            )
            raise ConfigError(
                "rounds.upload_buffer_mb",
                f"{self.upload_buffer_mb} MiB cannot hold {what} "
                f"({largest_body / 2**20:.1f} MiB); raise it to at least "
                f"{-(-largest_body // 2**20)}" + ("" if streamed else " or lower max_dim"),
            )
        if self.keep_results < 1:
            raise ConfigError("rounds.keep_results", f"must be >= 1, got {self.keep_results}")

    @property
    def upload_buffer_bytes(self) -> int:
        """``upload_buffer_mb`` in bytes."""
        return self.upload_buffer_mb << 20


@dataclass(frozen=True)
class Deadlines:
    """Time limits, in seconds, each in (0, 86400] (the ``deadlines`` section).

    ``step_s``: one exchange between aggregators (a party that does not answer in time is
    treated as lost: the round fails and the parties reconnect). ``upload_s``: receiving one
    request body. ``startup_s``: how long a launcher waits for all parties to connect.
    """

    step_s: float = 30.0
    upload_s: float = 120.0
    startup_s: float = 60.0

    def __post_init__(self) -> None:
        for key in yaml_keys(Deadlines):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value <= _MAX_DEADLINE_S
            ):
                raise ConfigError(
                    f"deadlines.{key}",
                    f"expected seconds in (0, {_MAX_DEADLINE_S}], got {value!r}",
                )
            object.__setattr__(self, key, float(value))


def parse_mechanism(value: object) -> Mechanism:
    """``dp.mechanism`` as a :class:`Mechanism` (``none``, no noise, is the reader's
    business: it means no ``dp`` section)."""
    if isinstance(value, Mechanism):
        return value
    name = expect(value, str, "dp.mechanism")
    if name == "skellam":
        raise ConfigError(
            "dp.mechanism",
            "skellam noise was drawn with numpy's floating-point Poisson sampler, which is "
            "not exact for large means (it leaks the parity of the noise); it is no longer "
            "offered: use discrete_gaussian (the same guarantee, drawn exactly)",
        )
    try:
        return Mechanism(name)
    except ValueError:
        raise ConfigError(
            "dp.mechanism", f"expected discrete_gaussian, binomial or none, got {name!r}"
        ) from None


@dataclass(frozen=True)
class DPSettings:
    """Differential privacy of every round's revealed total (the ``dp`` section).

    ``mechanism``: :attr:`Mechanism.DISCRETE_GAUSSIAN` (each aggregator adds its own exactly
    drawn discrete Gaussian noise to its share before the reveal) or
    :attr:`Mechanism.BINOMIAL` (joint binomial noise from secret random bits inside MPyC;
    needs ``m >= 3``, ``threshold >= 1`` and ``max_colluding <= threshold``). A string value
    is accepted and converted. ``epsilon``, ``delta``: the per-round target. ``l2_clip``:
    each client's vector is clipped to this L2 norm (float units) before encoding.
    ``max_colluding``: aggregators that may pool their knowledge of their own noise; the
    others' noise alone meets the target (YAML default: the threshold).
    ``budget_epsilon``, ``budget_delta`` (YAML ``budget: {epsilon, delta}``): the total
    over all rounds; a round that would exceed it is refused before any noise is added or
    anything revealed.
    """

    mechanism: Mechanism
    epsilon: float
    delta: float
    l2_clip: float
    max_colluding: int
    budget_epsilon: float = field(metadata={YAML: "budget.epsilon"})
    budget_delta: float = field(metadata={YAML: "budget.delta"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", parse_mechanism(self.mechanism))
        for key, path, upper in (
            ("epsilon", "dp.epsilon", math.inf),
            ("delta", "dp.delta", 1.0),
            ("l2_clip", "dp.l2_clip", math.inf),
        ):
            object.__setattr__(self, key, _positive(getattr(self, key), path, upper))
        colluding = expect(self.max_colluding, int, "dp.max_colluding")
        if colluding < 0:
            raise ConfigError("dp.max_colluding", f"must be >= 0, got {colluding}")
        budget_epsilon = _positive(self.budget_epsilon, "dp.budget.epsilon")
        budget_delta = _positive(self.budget_delta, "dp.budget.delta", upper=1.0)
        object.__setattr__(self, "budget_epsilon", budget_epsilon)
        object.__setattr__(self, "budget_delta", budget_delta)
        if budget_epsilon < self.epsilon or budget_delta < self.delta:
            raise ConfigError(
                "dp.budget",
                f"the budget (epsilon={budget_epsilon:g}, delta={budget_delta:g}) is smaller "
                f"than one round (epsilon={self.epsilon:g}, delta={self.delta:g}): no round "
                "could run",
            )


@dataclass(frozen=True)
class Topology:
    """A validated aggregator topology. Load one with :meth:`Topology.load`.

    ``threshold`` is MPyC's Shamir threshold ``t`` (``2t < m``); ``m`` is the number of
    aggregators; aggregator 0 is the leader. ``data_dir`` holds each aggregator's journals,
    round index and privacy ledger (``aggregator-{i}/``); read from a file it is absolute
    (:meth:`load`), and a party may keep its state elsewhere (its own settings: README,
    "Running aggregators"); it is not fingerprinted.
    ``source`` names the file it was read from (it prefixes every error).
    """

    name: str
    aggregators: tuple[AggregatorAddress, ...]
    threshold: int
    rounds: RoundPolicy
    encoding: FixedPointEncoding
    data_dir: Path
    fsync: bool = True
    deadlines: Deadlines = Deadlines()
    insecure: bool = False
    dp: DPSettings | None = None
    source: str | None = field(default=None, metadata={YAML: None})

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ConfigError as exc:
            if exc.source is not None or self.source is None:
                raise
            raise ConfigError(exc.path, exc.detail, self.source) from None

    def _validate(self) -> None:
        name = expect(self.name, str, "name")
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise ConfigError("name", f"use letters, digits, '.', '_' or '-', got {name!r}")
        self._validate_aggregators()
        m = self.m
        threshold = expect(self.threshold, int, "threshold")
        if threshold < 0 or 2 * threshold >= m:
            hint = (
                " With m = 2 set threshold: 0 (MPyC then runs without secrecy between the two "
                "parties, so only the additive path, a sum of client shares, is private)."
                if m == 2
                else f" The largest allowed threshold for {m} aggregators is {(m - 1) // 2}."
            )
            raise ConfigError(
                "threshold",
                f"{threshold} with {m} aggregators: MPyC's Shamir secret sharing needs an "
                f"honest majority, 2t < m.{hint}",
            )
        for key, cls, optional in (
            ("rounds", RoundPolicy, False),
            ("encoding", FixedPointEncoding, False),
            ("deadlines", Deadlines, False),
            ("dp", DPSettings, True),
        ):
            value = getattr(self, key)
            if not (isinstance(value, cls) or (optional and value is None)):
                raise ConfigError(key, f"expected {cls.__name__}, got {type(value).__name__}")
        object.__setattr__(self, "data_dir", _directory(self.data_dir, "data_dir"))
        expect(self.fsync, bool, "fsync")
        self._validate_insecure()
        if self.dp is not None:
            self._validate_dp(self.dp)
        self.encoding.check_headroom(self.rounds.max_clients)
        if self.dp is not None:
            # The noise grows with the dimension: a dp section under which not even a round
            # of dimension 1 could run (noise beyond the exact sampler's range, or beyond the
            # overflow headroom) could reveal nothing. Larger rounds are checked at open.
            tail = _noise_tail_at_dimension_1(self.dp, self.encoding, m)
            self.encoding.check_headroom(self.rounds.max_clients, noise_tail=tail)

    def _validate_aggregators(self) -> None:
        if isinstance(self.aggregators, list):
            object.__setattr__(self, "aggregators", tuple(self.aggregators))
        aggregators = expect(self.aggregators, tuple, "aggregators")
        if not 2 <= len(aggregators) <= MAX_AGGREGATORS:
            raise ConfigError(
                "aggregators",
                f"need 2..{MAX_AGGREGATORS} aggregators, got {len(aggregators)}: with one "
                "aggregator there is nobody to split a secret with",
            )
        seen: dict[tuple[str, int], str] = {}
        for i, a in enumerate(aggregators):
            if not isinstance(a, AggregatorAddress) or a.index != i:
                raise ConfigError(
                    f"aggregators[{i}]", f"expected the AggregatorAddress of index {i}, got {a!r}"
                )
            host = _LOOPBACK if a.host.lower() in _LOOPBACK_NAMES else a.host.lower()
            for key, port in (("mpc_port", a.mpc_port), ("http_port", a.http_port)):
                here = f"aggregators[{i}].{key}"
                if (host, port) in seen:
                    raise ConfigError(
                        here, f"port {port} on {a.host} is already used by {seen[(host, port)]}"
                    )
                seen[(host, port)] = here

    def _validate_insecure(self) -> None:
        """``insecure: true`` (no HTTPS, no tokens) only with every address on loopback; the
        scheme of every address follows it."""
        insecure = expect(self.insecure, bool, "insecure")
        if insecure:
            remote = [a.host for a in self.aggregators if not is_loopback(a.host)]
            if remote:
                raise ConfigError(
                    "insecure",
                    f"insecure: true (plain HTTP, no tokens) is allowed only when every "
                    f"aggregator is on loopback; {', '.join(remote)} is not",
                )
        scheme = "http" if insecure else "https"
        if any(a.scheme != scheme for a in self.aggregators):
            object.__setattr__(
                self, "aggregators", tuple(replace(a, scheme=scheme) for a in self.aggregators)
            )

    @property
    def has_keys(self) -> bool:
        """True when every aggregator names its public keys (not a template)."""
        return all(a.has_keys for a in self.aggregators)

    def _validate_dp(self, dp: DPSettings) -> None:
        m, threshold = self.m, self.threshold
        if dp.mechanism is Mechanism.BINOMIAL:
            if m < 3:
                raise ConfigError(
                    "dp.mechanism",
                    f"binomial noise is built inside MPyC from jointly generated secret random "
                    f"bits, which needs m >= 3 aggregators: with m = {m}, MPyC's threshold is "
                    "0, so every 'secret' bit would be known to both aggregators; use "
                    "discrete_gaussian",
                )
            if threshold < 1:
                raise ConfigError(
                    "dp.mechanism",
                    "binomial noise is generated as secret-shared bits inside MPyC, which "
                    "needs threshold >= 1 (with threshold 0 MPyC's shares are the plain values)",
                )
        ring = self.encoding.ring
        if dp.mechanism is Mechanism.BINOMIAL and ring is not GF_P61:
            raise ConfigError(
                "encoding.ring",
                f"{ring.name} cannot carry joint binomial noise: the shares of the total enter "
                "MPyC as secret-shared elements of GF(2^61-1), and a sum that wraps modulo "
                "2^32 is not a sum there; use ring gf_p61 with binomial, or discrete_gaussian "
                f"with {ring.name}",
            )
        _check_colluding(dp.max_colluding, m)
        if dp.mechanism is Mechanism.BINOMIAL and dp.max_colluding > threshold:
            raise ConfigError(
                "dp.max_colluding",
                f"{dp.max_colluding} exceeds threshold = {threshold}: joint noise is secret "
                f"only against up to t = {threshold} colluding aggregators (MPyC's Shamir "
                "threshold)",
            )
        _check_l2_clip(self.encoding.l2_clip, dp.l2_clip)

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
        """Load and validate a YAML topology; raises :class:`~mpc_agg.errors.ConfigError`.

        A relative ``data_dir`` (or the default, ``.mpc_agg-data/<name>``) resolves against
        the directory of the file, not the current one: the same file names the same data
        directory wherever it is started from."""
        path = Path(path)
        return cls.from_dict(read_document(path), source=str(path), relative_to=path.parent)

    @classmethod
    def from_dict(
        cls, data: object, source: str = "<dict>", *, relative_to: str | Path | None = None
    ) -> Topology:
        """Validate an already-parsed YAML document (a dict); errors carry ``source``.

        ``relative_to``: the directory a relative ``data_dir`` resolves against (the
        result is absolute); without it a relative ``data_dir`` stays relative, i.e. it
        resolves against the current directory when used."""
        try:
            topology = _read_topology(data, source)
        except ConfigError as exc:
            if exc.source == source:
                raise
            raise ConfigError(exc.path, exc.detail, source) from None
        if relative_to is None or topology.data_dir.is_absolute():
            return topology
        return replace(topology, data_dir=(Path(relative_to) / topology.data_dir).resolve())

    def with_absolute_paths(self) -> Topology:
        """The same topology with a relative ``data_dir`` resolved against the current
        directory (a topology built in code; :meth:`load` resolves against the file's
        directory already)."""
        return replace(self, data_dir=self.data_dir.resolve())

    def ledger_path(self, index: int) -> Path:
        """Aggregator ``index``'s privacy ledger (rounds' privacy cost, append-only)."""
        return self.aggregator_dir(index) / "privacy-ledger.jsonl"

    def aggregator_dir(self, index: int) -> Path:
        """The journal directory of aggregator ``index``."""
        return self.data_dir / f"aggregator-{index}"


def _check_colluding(max_colluding: int, m: int) -> None:
    if not 0 <= max_colluding <= m - 1:
        raise ConfigError(
            "dp.max_colluding",
            f"must be in 0..{m - 1} (at least one of the {m} aggregators must be honest for "
            f"its noise to protect the total), got {max_colluding}",
        )


def _check_l2_clip(encoding_l2_clip: float | None, dp_l2_clip: float) -> None:
    """The encoding must clip to the L2 norm the noise is calibrated to."""
    if encoding_l2_clip != dp_l2_clip:
        raise ConfigError(
            "encoding.l2_clip",
            f"{encoding_l2_clip} differs from dp.l2_clip = {dp_l2_clip}; set it once, "
            "under dp (the noise is calibrated to it)",
        )


@functools.lru_cache(maxsize=64)
def _noise_tail_at_dimension_1(dp: DPSettings, encoding: FixedPointEncoding, m: int) -> int:
    """The noise tail of a round of dimension 1 (raises ConfigError if none can be drawn);
    cached, since ``replace`` (e.g. :meth:`Topology.with_absolute_paths`) validates again."""
    return plan_noise(dp, encoding, 1, m).tail


# --------------------------------------------------------------------------- reading YAML


def _read_topology(data: object, source: str) -> Topology:
    """The document ``data`` read into the constructors above, which check the values."""
    if not isinstance(data, dict):
        raise ConfigError("<root>", f"a topology is a mapping of keys, got {type(data).__name__}")
    for gone in ("tls", "auth"):
        if gone in data:
            raise ConfigError(
                gone,
                "the tls and auth sections are gone: every party link is mutually "
                "authenticated TLS with the keys the aggregators entries name, every HTTP "
                "request needs a token, and the local launcher provisions both (README, "
                '"Security model"); remove the section (or set insecure: true on loopback)',
            )
    root = Section(data, "", yaml_keys(Topology))
    name = root.get("name", str)
    scheme = "http" if root.get("insecure", bool, False) else "https"
    aggregators = tuple(
        _read_address(i, raw, scheme) for i, raw in enumerate(root.get("aggregators", list))
    )
    threshold = root.get("threshold", int, (len(aggregators) - 1) // 2)
    rounds = RoundPolicy(**root.section("rounds", yaml_keys(RoundPolicy), {}).fields(RoundPolicy))
    dp = _read_dp(root, threshold, len(aggregators))
    encoding = _read_encoding(root, dp)
    data_dir = Path(root.get("data_dir", str, f".mpc_agg-data/{name}"))
    fsync = root.get("fsync", bool, True)
    deadlines_section = root.section("deadlines", yaml_keys(Deadlines), {})
    deadlines = Deadlines(**deadlines_section.fields(Deadlines, null_is_default=False))
    insecure = root.get("insecure", bool, False)
    return Topology(
        name=name,
        aggregators=aggregators,
        threshold=threshold,
        rounds=rounds,
        encoding=encoding,
        data_dir=data_dir,
        fsync=fsync,
        deadlines=deadlines,
        insecure=insecure,
        dp=dp,
        source=source,
    )


def _read_address(index: int, raw: object, scheme: str) -> AggregatorAddress:
    path = f"aggregators[{index}]"
    keys = yaml_keys(AggregatorAddress)
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping with {keys}, got {raw!r}")
    args = Section(raw, path, keys).fields(AggregatorAddress)
    return AggregatorAddress(index=index, scheme=scheme, **args)


def _read_dp(root: Section, threshold: int, m: int) -> DPSettings | None:
    """The ``dp`` section, or None without one (or with ``mechanism: none``)."""
    if not root.has("dp"):
        return None
    section = root.section("dp", yaml_keys(DPSettings))
    mechanism = section.get("mechanism", str)
    if mechanism == "none":
        return None
    parse_mechanism(mechanism)  # before any other key: a wrong mechanism explains the most
    args = section.fields(DPSettings, max_colluding=threshold)
    colluding = args["max_colluding"]
    if isinstance(colluding, int) and not isinstance(colluding, bool) and colluding < 0:
        _check_colluding(colluding, m)  # the message that names the range for m aggregators
    return DPSettings(**args)


def _read_encoding(root: Section, dp: DPSettings | None) -> FixedPointEncoding:
    """The ``encoding`` section; with ``dp``, ``l2_clip`` defaults to ``dp.l2_clip``."""
    section = root.section("encoding", yaml_keys(FixedPointEncoding), {})
    args: dict[str, Any] = section.fields(FixedPointEncoding)
    if "frac_bits" in args:
        expect(args["frac_bits"], int, "encoding.frac_bits")
    if "ring" in args:
        try:
            args["ring"] = ring_named(args["ring"])
        except ValueError as exc:
            raise ConfigError("encoding.ring", str(exc)) from None
    for key in ("coord_clip", "l2_clip"):
        value = args.get(key)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ConfigError(f"encoding.{key}", f"expected a finite number or null, got {value!r}")
        args[key] = float(value)
    if dp is not None:
        if args.get("l2_clip") is None:
            args["l2_clip"] = dp.l2_clip  # set once, under dp
        _check_l2_clip(args["l2_clip"], dp.l2_clip)  # before the encoding's own checks
    return FixedPointEncoding(**args)
