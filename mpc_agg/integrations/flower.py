"""Flower adapter: secure aggregation (and DP) for a Flower app in two changed lines.

For ``flwr >= 1.41`` (the Message API: ``ServerApp``, ``ClientApp``,
``flwr.serverapp.strategy.FedAvg``); install the ``flower`` extra. This module imports
``flwr``; :mod:`mpc_agg.integrations` loads it only when one of its names is used.

Server: replace ``FedAvg(...)`` with ``MpcFedAvg.from_context(context, ...)`` (same keyword
arguments; the topology and the collector's grants come from the run config) or
``MpcFedAvg(topology, collector_token=..., ...)``. Client: build the ``ClientApp`` with
``mods=[secure_train_mod()]``; the train function stays as it is (it returns its trained
arrays and a metric record with ``"num-examples"``, as for FedAvg). Each node reads its
topology, grant files (hence its client id) and secret from its node config when a train
message arrives (:func:`node_settings`; keys :data:`NODE_KEYS` and :data:`RUN_KEYS`).
mpc_agg must be installed where the ServerApp and every ClientApp run (README, "Federated
learning (Flower)").

One Flower round then goes as follows (weighting and clipping: :mod:`~.fedavg`):

1. ``MpcFedAvg.configure_train`` opens mpc_agg round ``{prefix}-r{server_round}`` on every
   aggregator (:class:`~mpc_agg.Collector`) and adds its id, the weighting and the names of
   the records to the train config sent to the sampled nodes (``mpc-*`` keys).
2. On each node, :func:`secure_train_mod` lets the train function run, takes the arrays it
   returns, and submits ``update = local - global`` (with the weight) as shares to the
   aggregators (:class:`~mpc_agg.Client`). It **removes every array record** from the reply:
   the Flower server receives only the metrics. A train message without an mpc_agg round
   (a plain FedAvg server) is refused rather than answered in the clear.
3. Once the replies are in, ``MpcFedAvg.aggregate_train`` asks the aggregators for the
   (noisy, with DP) total, divides it (summed weight, or number of clients), adds the mean
   update to the global model and continues as FedAvg. Round metrics gain ``mpc-*``
   entries (clients counted, and with DP the round's and the run's epsilon).

What the Flower server still sees in the clear: the global model (it computes it), each
client's metrics (including ``num-examples``) and which nodes replied. Keep metrics coarse
when they are sensitive: they are outside mpc_agg's protection and outside the DP guarantee.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log

from mpc_agg.client import Client, load_client_secret
from mpc_agg.collector import Collector
from mpc_agg.config.schema import Topology
from mpc_agg.core.codec import check_id
from mpc_agg.credentials import read_grants, tokens_for
from mpc_agg.errors import (
    AggregationTimeout,
    ConfigError,
    InvalidRequest,
    LayoutError,
    RoundFailed,
    UsageError,
)
from mpc_agg.integrations.fedavg import (
    FedAvgResult,
    FedAvgScheme,
    Weighting,
    aggregate_updates,
    open_fedavg_round,
    submit_update,
)
from mpc_agg.integrations.model import ModelLayout, flatten

__all__ = [
    "CONFIG_KEYS",
    "NODE_KEYS",
    "RUN_KEYS",
    "MpcFedAvg",
    "NodeSettings",
    "node_settings",
    "record_to_vector",
    "secure_train_mod",
    "vector_to_record",
]

ROUND_KEY = "mpc-round-id"
WEIGHTING_KEY = "mpc-weighting"
WEIGHT_SCALE_KEY = "mpc-weight-scale"
WEIGHT_METRIC_KEY = "mpc-weight-key"
ARRAYS_KEY = "mpc-arrays-key"
TOPOLOGY_KEY = "mpc-topology"
CONFIG_KEYS = (
    ROUND_KEY,
    WEIGHTING_KEY,
    WEIGHT_SCALE_KEY,
    WEIGHT_METRIC_KEY,
    ARRAYS_KEY,
    TOPOLOGY_KEY,
)
"""The train-config entries :class:`MpcFedAvg` sends and :func:`secure_train_mod` reads."""


def _load(topology: Topology | str | Path) -> Topology:
    return topology if isinstance(topology, Topology) else Topology.load(topology)


def record_to_vector(arrays: ArrayRecord) -> tuple[npt.NDArray[np.float64], ModelLayout]:
    """An ``ArrayRecord``'s arrays (in key order) as one float64 vector, and its layout."""
    return flatten({key: array.numpy() for key, array in arrays.items()})


def vector_to_record(vector: npt.ArrayLike, layout: ModelLayout) -> ArrayRecord:
    """The ``ArrayRecord`` with ``layout``'s keys, shapes and dtypes, filled from ``vector``."""
    values = layout.unflatten(vector)
    return ArrayRecord({k: Array.from_numpy_ndarray(np.asarray(v)) for k, v in values.items()})


# --------------------------------------------------------------------------- Flower config

TOPOLOGY_CONFIG = "mpc-agg-topology"
CLIENT_ID_CONFIG = "mpc-agg-client-id"
TOKENS_CONFIG = "mpc-agg-tokens"
SECRET_CONFIG = "mpc-agg-secret"
COLLECTOR_TOKENS_CONFIG = "mpc-agg-collector-tokens"
NODE_KEYS = (TOPOLOGY_CONFIG, CLIENT_ID_CONFIG, TOKENS_CONFIG, SECRET_CONFIG)
"""Node-config keys :func:`secure_train_mod` reads (``flower-supernode --node-config``)."""
RUN_KEYS = (TOPOLOGY_CONFIG, COLLECTOR_TOKENS_CONFIG)
"""Run-config keys (``[tool.flwr.app.config]``): the topology (every process may fall back
to it) and the collector's grants (read by :meth:`MpcFedAvg.from_context`)."""
_PER_NODE = (CLIENT_ID_CONFIG, TOKENS_CONFIG, SECRET_CONFIG)
_RENAMED = {"mpc-token": TOKENS_CONFIG}

_NODE = "Flower node config"
_RUN = "Flower run config"
_SET_NODE = "flower-supernode --node-config '{key}=\"...\"'"
_SET_RUN = "[tool.flwr.app.config] in the app's pyproject.toml, or flwr run --run-config"


def _config_str(context: Context, key: str, node: bool) -> tuple[str, str] | None:
    """``(value, source)`` of ``key`` in the node config (``node``) or the run config; an
    empty string counts as unset, so an app can declare a key in ``[tool.flwr.app.config]``
    (which ``flwr run --run-config`` requires before overriding it) without a value."""
    config, source = (context.node_config, _NODE) if node else (context.run_config, _RUN)
    value = config.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a path or id (a non-empty string), got {value!r}", source)
    return value.strip(), source


def _config_path(key: str, value: str, source: str) -> Path:
    """An absolute path from a config value (``~`` expanded); relative paths are refused:
    Flower picks the working directory of a ServerApp or ClientApp process (the SuperLink's
    or SuperNode's, a Ray worker's in simulation), so it is no base to resolve against."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        raise ConfigError(
            key,
            f"{value!r} is a relative path; give an absolute one (the directory a Flower "
            "app process runs in is Flower's choice)",
            source,
        )
    return path


def _config_paths(key: str, value: str, source: str) -> list[Path]:
    """A comma-separated list of absolute paths."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return [_config_path(key, p, source) for p in parts]


def _topology_of(
    context: Context, fallback: Topology | str | Path | None, *, node: bool, caller: str
) -> Topology:
    """The topology named by the node config (if ``node``), else the run config, else
    ``fallback``; :class:`ConfigError` naming the key and where to set it when none does."""
    found = (_config_str(context, TOPOLOGY_CONFIG, True) if node else None) or _config_str(
        context, TOPOLOGY_CONFIG, False
    )
    if found is not None:
        value, source = found
        path = _config_path(TOPOLOGY_CONFIG, value, source)
        try:
            return Topology.load(path)
        except ConfigError as exc:
            where = (
                f" (the run config's path, for the SuperLink's machine: set {TOPOLOGY_CONFIG} "
                "in this SuperNode's node config)"
                if source == _RUN and node
                else ""
            )
            raise ConfigError(TOPOLOGY_CONFIG, f"{exc}{where}", source) from None
    if fallback is not None:
        return _load(fallback)
    places = (
        f"this SuperNode's node config ({_SET_NODE.format(key=TOPOLOGY_CONFIG)}) or "
        if node
        else ""
    )
    raise ConfigError(
        TOPOLOGY_CONFIG,
        f"no topology: set it (an absolute path) in {places}the run config ({_SET_RUN}), "
        f"or pass {caller}(topology)",
    )


def _grant_tokens(
    topology: Topology, key: str, value: str, source: str, role: str
) -> tuple[list[str], str | None]:
    """The tokens (in aggregator order) of the grant files ``value`` names, and their
    client id (None for the collector's)."""
    paths = _config_paths(key, value, source)
    if not paths:
        raise ConfigError(key, f"names no grant file: {value!r}", source)
    try:
        grants = read_grants(paths)
        tokens = tokens_for(topology, grants, role)
    except ConfigError as exc:
        raise ConfigError(key, str(exc), source) from None
    return tokens, grants[0][1].client


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class _OpenRound:
    round_id: str
    global_vector: npt.NDArray[np.float64]
    layout: ModelLayout


class MpcFedAvg(FedAvg):
    """Flower's ``FedAvg`` with the clients' updates summed by mpc_agg's aggregators.

    ``topology``: the aggregators (a :class:`~mpc_agg.Topology` or a YAML path); with a
    ``dp`` section every aggregate is differentially private. ``collector_token``: the
    collector's token at each aggregator, required unless the topology is ``insecure``:
    one per aggregator in index order (each aggregator issues its own, ``collector.token``
    in its party directory; for a local federation ``deployment.collector_tokens()``), or
    their comma-separated line. ``weighting``: ``"examples"``
    (weighted by the clients' ``weighted_by_key`` metric; default without DP) or
    ``"uniform"`` (the only choice with DP); ``weight_scale``: the public constant clients
    divide their weight by (see :class:`~mpc_agg.integrations.FedAvgScheme`).
    ``min_clients``: fewest clients whose sum may be revealed (default: the topology's).
    ``round_prefix``: mpc_agg round ids are ``{round_prefix}-r{server_round}`` (default: a
    fresh random prefix, so runs against the same aggregators never collide).
    ``aggregate_timeout``: seconds to wait for the reveal. Other keyword arguments go to
    ``FedAvg`` unchanged.

    ``history`` maps each server round to its :class:`~mpc_agg.integrations.FedAvgResult`.
    In a ServerApp's ``main``, :meth:`from_context` takes the topology and the collector's
    grants from the run config instead.
    """

    def __init__(
        self,
        topology: Topology | str | Path,
        *,
        collector_token: str | Sequence[str] | None = None,
        weighting: Weighting | None = None,
        weight_scale: float = 1.0,
        min_clients: int | None = None,
        round_prefix: str | None = None,
        aggregate_timeout: float = 120.0,
        **fedavg_kwargs: object,
    ) -> None:
        super().__init__(**fedavg_kwargs)  # type: ignore[arg-type]
        self.topology = _load(topology)
        self.scheme = FedAvgScheme.for_topology(self.topology, weighting, weight_scale)
        self.collector = Collector(self.topology, token=collector_token)
        self.min_clients = min_clients
        self.round_prefix = check_id("round prefix", round_prefix or f"flwr-{secrets.token_hex(6)}")
        self.aggregate_timeout = aggregate_timeout
        self.history: dict[int, FedAvgResult] = {}
        self._open: dict[int, _OpenRound] = {}

    @classmethod
    def from_context(
        cls,
        context: Context,
        topology: Topology | str | Path | None = None,
        *,
        collector_token: str | Sequence[str] | None = None,
        **kwargs: Any,
    ) -> MpcFedAvg:
        """An ``MpcFedAvg`` set up from the ServerApp's run config (``context.run_config``).

        Topology: the run config's ``mpc-agg-topology`` (an absolute path on the SuperLink's
        machine), else ``topology``. Collector tokens: ``mpc-agg-collector-tokens``, the
        absolute path of a directory of the collector's grant files (``mpc-agg token
        --collector`` at each aggregator writes ``collector-<index>.token``) or a
        comma-separated list of them, else ``collector_token``; required unless the
        topology is ``insecure``. Other keyword arguments go to ``MpcFedAvg`` (and FedAvg).
        Raises :class:`~mpc_agg.errors.ConfigError` naming the key and where to set it.
        """
        topo = _topology_of(context, topology, node=False, caller="MpcFedAvg.from_context")
        found = _config_str(context, COLLECTOR_TOKENS_CONFIG, False)
        tokens: str | Sequence[str] | None = collector_token
        if found is not None:
            tokens = _grant_tokens(topo, COLLECTOR_TOKENS_CONFIG, *found, role="collector")[0]
        if not topo.insecure and not tokens:
            raise ConfigError(
                COLLECTOR_TOKENS_CONFIG,
                f"no collector tokens, and topology {topo.name!r} requires one per aggregator: "
                f"set {COLLECTOR_TOKENS_CONFIG} (the directory of the collector's grant files) "
                f"in the run config ({_SET_RUN}), or pass collector_token=...",
            )
        return cls(topo, collector_token=tokens, **kwargs)

    def round_id(self, server_round: int) -> str:
        """The mpc_agg round id of Flower round ``server_round``."""
        return f"{self.round_prefix}-r{server_round}"

    def summary(self) -> None:
        """Log FedAvg's summary and where the updates go."""
        super().summary()
        log(INFO, "\t└──> Secure aggregation (mpc_agg):")
        log(INFO, "\t\t├── Topology: %s (%d aggregators)", self.topology.name, self.topology.m)
        log(
            INFO,
            "\t\t├── Weighting: %s (weight_scale %g)",
            self.scheme.weighting,
            self.scheme.weight_scale,
        )
        dp = self.topology.dp
        log(
            INFO,
            "\t\t└── DP: %s",
            f"{dp.mechanism}, epsilon {dp.epsilon:g} per round, budget {dp.budget_epsilon:g}"
            if dp
            else "none (exact sums)",
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Open the round's mpc_agg round and tell the sampled nodes its id."""
        round_id = self.round_id(server_round)
        vector, layout = record_to_vector(arrays)
        config[ROUND_KEY] = round_id
        config[WEIGHTING_KEY] = self.scheme.weighting
        config[WEIGHT_SCALE_KEY] = float(self.scheme.weight_scale)
        config[WEIGHT_METRIC_KEY] = self.weighted_by_key
        config[ARRAYS_KEY] = self.arrayrecord_key
        config[TOPOLOGY_KEY] = self.topology.name
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if messages:
            open_fedavg_round(
                self.collector, round_id, layout.size, self.scheme, min_clients=self.min_clients
            )
            self._open[server_round] = _OpenRound(round_id, vector, layout)
            log(INFO, "configure_train: opened mpc_agg round %s (dim %d)", round_id, layout.size)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reveal the round's total, average it and update the global model.

        Replies carry only metrics; arrays found in a reply are ignored (and logged): the
        update must come through the aggregators. A round the aggregators fail (too few
        clients, for instance) leaves the global model unchanged, as FedAvg does without
        replies; a round refused for the privacy budget stops the run
        (``PrivacyBudgetExhausted``), since every later round would be refused too.
        """
        opened = self._open.pop(server_round, None)
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        log(
            INFO,
            "aggregate_train: received %d results and %d failures",
            len(valid),
            len(replies) - len(valid),
        )
        for m in replies:
            if m.has_error():
                log(INFO, "\t> error from node %d: %s", m.metadata.src_node_id, m.error.reason)
            elif m.content.array_records:
                log(
                    WARNING,
                    "\t> node %d sent arrays to the Flower server; ignored (its ClientApp "
                    "lacks secure_train_mod)",
                    m.metadata.src_node_id,
                )
        if opened is None:
            return None, None
        metrics = None
        contents = [m.content for m in valid]
        if contents:
            validate_message_reply_consistency(
                replies=contents, weighted_by_key=self.weighted_by_key, check_arrayrecord=False
            )
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        try:
            out = aggregate_updates(
                self.collector,
                opened.round_id,
                scheme=self.scheme,
                timeout=self.aggregate_timeout,
            )
        except RoundFailed as exc:
            # Match the failure code, never the message.
            if exc.code == "budget_exceeded":
                raise PrivacyBudgetExhausted(str(exc)) from exc
            log(WARNING, "aggregate_train: %s; the global model is unchanged", exc)
            return None, metrics
        except AggregationTimeout as exc:
            log(WARNING, "aggregate_train: %s; the global model is unchanged", exc)
            return None, metrics
        self.history[server_round] = out
        arrays = vector_to_record(opened.global_vector + out.mean, opened.layout)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["mpc-num-clients"] = out.num_clients
        metrics["mpc-total-weight"] = out.total_weight
        if out.epsilon is not None:
            metrics["mpc-epsilon"] = float(out.epsilon)
            metrics["mpc-cumulative-epsilon"] = float(out.cumulative_epsilon or 0.0)
            metrics["mpc-noise-stddev"] = float(out.noise_stddev or 0.0)
        log(
            INFO,
            "aggregate_train: mpc_agg round %s revealed the sum of %d clients%s",
            opened.round_id,
            out.num_clients,
            f" (epsilon spent so far {out.cumulative_epsilon:.4g})" if out.epsilon else "",
        )
        return arrays, metrics


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, repr=False)
class NodeSettings:
    """What :func:`secure_train_mod` submits with on one node: the topology, the client id,
    the tokens (one per aggregator, None on an ``insecure`` topology) and the client secret
    (None: seeds from the OS). ``client_id_source`` says where the id came from. The repr
    hides the tokens and the secret."""

    topology: Topology
    client_id: str
    tokens: str | Sequence[str] | None
    secret: bytes | None
    client_id_source: str

    def __repr__(self) -> str:
        return (
            f"NodeSettings(client {self.client_id!r} ({self.client_id_source}), topology "
            f"{self.topology.name!r}, tokens {'set' if self.tokens else 'none'}, secret "
            f"{'set' if self.secret is not None else 'none'})"
        )


TokenSource = str | Sequence[str] | Callable[[Context], "str | Sequence[str] | None"] | None
ClientIdSource = str | Callable[[Context], "str | None"] | None


def node_settings(
    context: Context,
    topology: Topology | str | Path | None = None,
    *,
    token: TokenSource = None,
    client_id: ClientIdSource = None,
    secret: bytes | str | Path | None = None,
) -> NodeSettings:
    """Resolve a node's mpc_agg settings from its Flower ``Context`` and the mod's arguments.

    Each setting comes from the node config (``flower-supernode --node-config``) first, then
    (the topology only) the run config, then the argument:

    * topology: ``mpc-agg-topology`` (an absolute path), else ``topology``;
    * tokens: ``mpc-agg-tokens``, the absolute path of a directory of this client's grant
      files (``mpc-agg token --client ID`` at each aggregator writes ``ID-<index>.token``)
      or a comma-separated list of grant files; else ``token`` (raw tokens, or a function
      of the context returning them);
    * client id: the one the grants were issued for; else ``mpc-agg-client-id``, else
      ``client_id`` (a string or a function of the context); else, on an ``insecure``
      topology only, ``flwr-node-{node_id}``. A configured id that differs from the grants'
      is an error, not a 403 from every aggregator;
    * secret: ``mpc-agg-secret``, the absolute path of the client's secret file (made on
      first use, :func:`~mpc_agg.client.load_client_secret`), else ``secret`` (bytes, or a
      path); with it a restarted node resubmits identical shares.

    Client id, tokens and secret are refused in the run config: every node sees the same
    one, so all nodes would be one client. Raises :class:`~mpc_agg.errors.ConfigError`
    naming the key and where it came from.
    """
    for key in _PER_NODE:
        if key in context.run_config:
            raise ConfigError(
                key,
                "is per node: set it in each SuperNode's node config "
                f"({_SET_NODE.format(key=key)}); every node sees the same run config",
                _RUN,
            )
    for old, new in _RENAMED.items():
        if old in context.node_config:
            raise ConfigError(old, f"renamed {new} (the paths of the grant files)", _NODE)
    topo = _topology_of(context, topology, node=True, caller="secure_train_mod")

    tokens: str | Sequence[str] | None
    granted_id: str | None = None
    grants = _config_str(context, TOKENS_CONFIG, True)
    if grants is not None:
        tokens, granted_id = _grant_tokens(topo, TOKENS_CONFIG, *grants, role="client")
    else:
        tokens = token(context) if callable(token) else token

    configured = _config_str(context, CLIENT_ID_CONFIG, True)
    if configured is not None:
        cid: str | None = configured[0]
        cid_source = f"{_NODE} {CLIENT_ID_CONFIG}"
    else:
        cid = client_id(context) if callable(client_id) else client_id
        cid_source = "secure_train_mod(client_id=...)"
    if granted_id is not None:
        if cid is not None and cid != granted_id:
            raise ConfigError(
                CLIENT_ID_CONFIG,
                f"the client id is {cid!r} ({cid_source}) but the grant files of "
                f"{TOKENS_CONFIG} were issued for {granted_id!r}; drop the id (the grants' "
                "is used) or use grants issued for it",
                _NODE,
            )
        cid, cid_source = granted_id, f"the grant files of {TOKENS_CONFIG}"
    if not topo.insecure and not tokens:
        raise ConfigError(
            TOKENS_CONFIG,
            f"no tokens for this node, and topology {topo.name!r} requires one per aggregator: "
            f"set {TOKENS_CONFIG} to the directory of this client's grant files "
            f"({_SET_NODE.format(key=TOKENS_CONFIG)}) or pass secure_train_mod(token=...)",
            _NODE,
        )
    if cid is None:
        if not topo.insecure:
            raise ConfigError(
                CLIENT_ID_CONFIG,
                f"no client id for these tokens: set {CLIENT_ID_CONFIG} "
                f"({_SET_NODE.format(key=CLIENT_ID_CONFIG)}) or pass "
                "secure_train_mod(client_id=...), the id the tokens were issued for",
                _NODE,
            )
        cid, cid_source = f"flwr-node-{context.node_id}", "the Flower node id (insecure topology)"
    try:
        cid = check_id("client", cid)
    except InvalidRequest as exc:
        raise ConfigError(CLIENT_ID_CONFIG, str(exc), cid_source) from None

    found_secret = _config_str(context, SECRET_CONFIG, True)
    if found_secret is not None:
        path = _config_path(SECRET_CONFIG, *found_secret)
        try:
            key_bytes: bytes | None = load_client_secret(path, create=True)
        except ConfigError as exc:
            raise ConfigError(SECRET_CONFIG, str(exc), _NODE) from None
    elif isinstance(secret, str | Path):
        key_bytes = load_client_secret(secret, create=True)
    else:
        key_bytes = secret
    return NodeSettings(topo, cid, tokens, key_bytes, cid_source)


def secure_train_mod(
    topology: Topology | str | Path | None = None,
    *,
    token: TokenSource = None,
    client_id: ClientIdSource = None,
    secret: bytes | str | Path | None = None,
) -> Mod:
    """A Flower client mod that sends the trained update to mpc_agg instead of the server.

    With no argument, everything comes from the Flower ``Context`` when a train message
    arrives (nothing is read at import): the topology from the node config's
    ``mpc-agg-topology`` or the run config's, the tokens and the client id from the grant
    files of the node config's ``mpc-agg-tokens``, the secret from ``mpc-agg-secret``. The
    arguments are the fallbacks for what the node config lacks (see :func:`node_settings`
    for the rules): ``topology``, the same aggregators as the server's ``MpcFedAvg`` (a
    :class:`~mpc_agg.Topology` or a YAML path); ``token``, this client's token at each
    aggregator (a sequence in index order, their comma-separated line, or a function of the
    ``Context`` returning either; for a local federation
    ``deployment.client_tokens(client_id)``); ``client_id``, the id those tokens were issued
    for (a string or a function of the ``Context``); ``secret``, the client secret (bytes or
    the path of its file).

    Train messages only; evaluate and query messages pass through untouched. The reply to a
    train message keeps its metric and config records and loses its array records.
    Raises (so Flower replies with an error) when the node's settings are missing or
    inconsistent (:class:`~mpc_agg.errors.ConfigError`), the train message opened no mpc_agg
    round, names another topology, or the trained arrays do not match the global model's
    layout.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        settings = node_settings(context, topology, token=token, client_id=client_id, secret=secret)
        topo = settings.topology
        config = _mpc_config(msg, topo)
        arrays_key = str(config[ARRAYS_KEY])
        if arrays_key not in msg.content.array_records:
            raise UsageError(f"the train message has no array record {arrays_key!r}")
        global_vector, layout = record_to_vector(msg.content.array_records[arrays_key])
        # for_topology refuses a weighted scheme under this client's own dp section.
        scheme = FedAvgScheme.for_topology(
            topo,
            str(config[WEIGHTING_KEY]),  # type: ignore[arg-type]
            float(config[WEIGHT_SCALE_KEY]),  # type: ignore[arg-type]
        )

        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        trained = _trained_arrays(reply, arrays_key)
        try:
            # Names and shapes must match; a dtype may differ (the update is float64 and the
            # server casts the new model to the global model's dtypes).
            local = layout.flatten({k: a.numpy() for k, a in trained.items()}, dtypes=False)
        except LayoutError as exc:
            raise LayoutError(f"the trained arrays do not match the global model: {exc}") from None
        weight = _weight(reply, str(config[WEIGHT_METRIC_KEY]), scheme)
        client = Client(topo, settings.client_id, token=settings.tokens, secret=settings.secret)
        submit_update(client, str(config[ROUND_KEY]), local - global_vector, weight, scheme=scheme)
        # Only metrics (and configs) go back to the Flower server.
        reply.content = RecordDict(
            {
                **dict(reply.content.metric_records.items()),
                **dict(reply.content.config_records.items()),
            }
        )
        return reply

    return mod


def _mpc_config(msg: Message, topology: Topology) -> ConfigRecord:
    """The train message's config record carrying the mpc_agg round (checked)."""
    for record in msg.content.config_records.values():
        if ROUND_KEY in record:
            missing = [k for k in CONFIG_KEYS if k not in record]
            if missing:
                raise UsageError(f"the train config lacks {missing} (server not MpcFedAvg?)")
            if record[TOPOLOGY_KEY] != topology.name:
                raise UsageError(
                    f"the server aggregates with topology {record[TOPOLOGY_KEY]!r}, this "
                    f"client is configured for {topology.name!r}"
                )
            return record
    raise UsageError(
        "the train message opens no mpc_agg round (is the server's strategy MpcFedAvg?); "
        "refusing to send the model update to the Flower server in the clear"
    )


def _trained_arrays(reply: Message, arrays_key: str) -> ArrayRecord:
    records = reply.content.array_records
    if arrays_key in records:
        return records[arrays_key]
    if len(records) == 1:
        return next(iter(records.values()))
    raise UsageError(
        f"the train function replied with {len(records)} array records "
        f"({sorted(records)}); expected one (key {arrays_key!r})"
    )


def _weight(reply: Message, key: str, scheme: FedAvgScheme) -> float:
    for record in reply.content.metric_records.values():
        if key in record:
            value = record[key]
            if isinstance(value, list):
                raise UsageError(f"metric {key!r} must be a number, got a list")
            return float(value)
    if scheme.weighting == "uniform":
        return 1.0
    raise UsageError(
        f"the train reply has no metric {key!r}: weighted FedAvg needs each client's weight"
    )
