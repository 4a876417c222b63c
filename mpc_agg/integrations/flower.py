"""Flower adapter: secure aggregation (and DP) for a Flower app in two changed lines.

For ``flwr >= 1.41`` (the Message API: ``ServerApp``, ``ClientApp``,
``flwr.serverapp.strategy.FedAvg``); install the ``flower`` extra. This module imports
``flwr``; :mod:`mpc_agg.integrations` loads it only when one of its names is used.

Server: replace ``FedAvg(...)`` with ``MpcFedAvg(topology, ...)`` (same keyword arguments).
Client: build the ``ClientApp`` with ``mods=[secure_train_mod(topology)]``; the train
function stays as it is (it returns its trained arrays and a metric record with
``"num-examples"``, as for FedAvg).

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

from mpc_agg.client import Client
from mpc_agg.collector import Collector
from mpc_agg.config.schema import Topology
from mpc_agg.core.codec import check_id
from mpc_agg.errors import AggregationTimeout, LayoutError, RoundFailed, UsageError
from mpc_agg.integrations.fedavg import (
    FedAvgResult,
    FedAvgScheme,
    Weighting,
    aggregate_updates,
    open_fedavg_round,
    submit_update,
)
from mpc_agg.integrations.model import ModelLayout, flatten

__all__ = ["CONFIG_KEYS", "MpcFedAvg", "record_to_vector", "secure_train_mod", "vector_to_record"]

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

TokenSource = str | Sequence[str] | Callable[[Context], "str | Sequence[str] | None"] | None


def secure_train_mod(
    topology: Topology | str | Path,
    *,
    token: TokenSource = None,
    client_id: str | Callable[[Context], str] | None = None,
) -> Mod:
    """A Flower client mod that sends the trained update to mpc_agg instead of the server.

    ``topology``: the same aggregators as the server's ``MpcFedAvg`` (with their keys: the
    topology the aggregators run). ``token``: this client's token at each aggregator,
    required unless the topology is ``insecure``; each aggregator issues its own for this
    client id (for a local federation ``deployment.client_tokens(client_id)``). Give them as
    a sequence (one per aggregator, in index order), their comma-separated line, or a
    function of the node's ``Context`` returning either; default:
    ``node_config["mpc-token"]`` if set. ``client_id``: the id under which this node
    submits, the one its tokens were issued for (a string or a function of the node's
    ``Context``; default ``flwr-node-{node_id}``).

    Train messages only; evaluate and query messages pass through untouched. The reply to a
    train message keeps its metric and config records and loses its array records.
    Raises (so Flower replies with an error) when the train message opened no mpc_agg
    round, names another topology, or the trained arrays do not match the global model's
    layout.
    """
    topo = _load(topology)

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
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
        cid = client_id(context) if callable(client_id) else client_id
        tok = token(context) if callable(token) else token
        if tok is None:
            tok = context.node_config.get("mpc-token")  # type: ignore[assignment]
        client = Client(topo, cid or f"flwr-node-{context.node_id}", token=tok)
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
