"""Federated averaging (FedAvg) through mpc_agg rounds: who submits what, who divides.

FedAvg's new model is the weighted mean ``sum_k w_k x_k / sum_k w_k`` of the clients'
vectors ``x_k`` (weights ``w_k``: usually their numbers of training examples). An mpc_agg
round reveals only a sum, so a :class:`FedAvgScheme` says what each client submits and how
the server turns the revealed total into the mean:

``weighting="examples"`` (the default without DP)
    Each client submits ``[w'·x, w']`` with ``w' = w / weight_scale``, in **one** round (one
    vector of length ``d + 1``), so numerator and denominator always cover the same clients
    (a client dropped from the round is dropped from both). The server divides the first
    ``d`` coordinates of the total by the last one. ``weight_scale`` is any public constant
    shared by all clients (it cancels in the ratio); choose it so that ``w'·x`` stays within
    the encoding's ``coord_clip`` (and ``l2_clip``). The client refuses to submit a vector
    that the encoding would clip (:class:`~mpc_agg.errors.EncodingError`): clipping would
    silently distort the average.

``weighting="uniform"`` (the only choice with a ``dp`` section)
    Each client submits ``x`` itself; the server divides the total by the number of
    clients in the round (``AggregateResult.num_clients``, which the aggregators reveal and
    the FL server knows anyway: it chose the clients). With DP, the encoding clips each
    submitted vector to ``dp.l2_clip`` (the sensitivity the noise is calibrated to), as in
    DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models",
    ICLR 2018, fixed-denominator estimator). Weighting by examples is refused under DP: the
    weight coordinate would itself be clipped with the vector (so ``w' <= l2_clip``) and
    would get the same noise as every coordinate, giving a denominator whose noise is
    comparable to its size for tens of clients; and the numbers of examples would be part
    of what the noise has to hide.

Submit model *updates* (local model minus global model), not whole models: updates are
small, so they fit the clip bounds, and under DP the clip norm bounds what one client can
change. The server adds the mean update to the global model (``flower.MpcFedAvg`` does).

The first half of this module is pure (vectors in, vectors out); the functions at the end
do the I/O through :class:`~mpc_agg.Client` and :class:`~mpc_agg.Collector`, each with an
``_async`` twin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from mpc_agg.client import Client, SubmitReceipt
from mpc_agg.collector import AggregateResult, Collector
from mpc_agg.config.schema import Topology
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.errors import EncodingError, UsageError

Weighting = Literal["examples", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")


@dataclass(frozen=True)
class FedAvgScheme:
    """What a FedAvg client submits to an mpc_agg round and how the server averages.

    ``weighting``: ``"examples"`` (submit ``[w'·x, w']``, divide by the summed weight) or
    ``"uniform"`` (submit ``x``, divide by the number of clients). ``weight_scale``: a
    public positive constant every client divides its weight by (``"examples"`` only).
    Build one for a topology with :meth:`for_topology`, which picks and checks the weighting.
    """

    weighting: Weighting = "examples"
    weight_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"weighting must be 'examples' or 'uniform', got {self.weighting!r}")
        ws = self.weight_scale
        if (
            isinstance(ws, bool)
            or not isinstance(ws, (int, float))
            or not (math.isfinite(ws) and ws > 0)
        ):
            raise UsageError(f"weight_scale must be a positive finite number, got {ws!r}")

    @classmethod
    def for_topology(
        cls,
        topology: Topology,
        weighting: Weighting | None = None,
        weight_scale: float = 1.0,
    ) -> FedAvgScheme:
        """The scheme for ``topology``: ``weighting`` defaults to ``"uniform"`` when the
        topology has a ``dp`` section and to ``"examples"`` otherwise; ``"examples"`` with
        DP is refused (see the module docstring)."""
        if weighting is None:
            weighting = "uniform" if topology.dp is not None else "examples"
        if weighting == "examples" and topology.dp is not None:
            raise UsageError(
                f"weighting='examples' with topology {topology.name!r}, which has a dp "
                "section: the weight coordinate would be clipped and noised like the update, "
                "leaving a noisy denominator; use weighting='uniform' (each client counts "
                "once, the server divides by the number of clients)"
            )
        return cls(weighting, weight_scale)

    # -- client side ------------------------------------------------------------------

    def submitted_dim(self, model_dim: int) -> int:
        """Length of the vector each client submits for a model of ``model_dim`` values."""
        return model_dim + 1 if self.weighting == "examples" else model_dim

    def contribution(
        self,
        update: npt.ArrayLike,
        weight: float = 1.0,
        encoding: FixedPointEncoding | None = None,
    ) -> npt.NDArray[np.float64]:
        """The vector a client submits: ``[w'·x, w']`` (``"examples"``) or ``x``
        (``"uniform"``, where ``weight`` is ignored).

        ``update``: 1-D, finite. ``weight``: finite, ``>= 0``. With ``encoding`` (the
        topology's) and ``"examples"``, raises :class:`~mpc_agg.errors.EncodingError` if the
        encoding would clip the vector, naming the bound and how to avoid it.
        """
        x = np.asarray(update, dtype=np.float64)
        if x.ndim != 1:
            raise EncodingError(f"update must be 1-dimensional, got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            bad = int(np.flatnonzero(~np.isfinite(x))[0])
            raise EncodingError(f"update has a non-finite value {x[bad]} at index {bad}")
        if self.weighting == "uniform":
            copied: npt.NDArray[np.float64] = x.copy()
            return copied
        if isinstance(weight, bool) or not (
            isinstance(weight, (int, float, np.integer, np.floating))
            and math.isfinite(weight)
            and weight >= 0
        ):
            raise EncodingError(f"weight must be a finite number >= 0, got {weight!r}")
        w = float(weight) / self.weight_scale
        vector = np.empty(x.shape[0] + 1, dtype=np.float64)
        np.multiply(x, w, out=vector[:-1])
        vector[-1] = w
        if encoding is not None:
            self.check_unclipped(vector, encoding)
        return vector

    def check_unclipped(
        self, vector: npt.NDArray[np.float64], encoding: FixedPointEncoding
    ) -> None:
        """Raise :class:`~mpc_agg.errors.EncodingError` if ``encoding`` would clip
        ``vector`` (a weighted contribution), which would distort the weighted average."""
        if np.array_equal(encoding.clip(vector), vector):
            return
        peak = float(np.max(np.abs(vector)))
        norm = float(np.linalg.norm(vector))
        bound = (
            f"max |value| {peak:.6g} > coord_clip {encoding.coord_clip:g}"
            if encoding.coord_clip is not None and peak > encoding.coord_clip
            else f"L2 norm {norm:.6g} > l2_clip {encoding.l2_clip:g}"
        )
        raise EncodingError(
            f"the weighted update [w'*x, w'] would be clipped by the encoding ({bound}), "
            f"which would distort the average; raise weight_scale (now {self.weight_scale:g}),"
            " the same for every client, so that w' = weight / weight_scale is smaller"
        )

    # -- server side ------------------------------------------------------------------

    def average(
        self, total: npt.ArrayLike, num_clients: int
    ) -> tuple[npt.NDArray[np.float64], float]:
        """The mean vector and the total weight, from a round's revealed ``total``.

        ``"examples"``: ``total[:-1] / total[-1]``, total weight ``total[-1] * weight_scale``
        (in the clients' units). ``"uniform"``: ``total / num_clients``, total weight
        ``num_clients``. Raises :class:`~mpc_agg.errors.UsageError` when there is nothing to
        divide by.
        """
        t = np.asarray(total, dtype=np.float64)
        if t.ndim != 1:
            raise UsageError(f"total must be 1-dimensional, got shape {t.shape}")
        if self.weighting == "uniform":
            if num_clients < 1:
                raise UsageError(f"cannot average over {num_clients} clients")
            return t / num_clients, float(num_clients)
        if t.shape[0] < 1:
            raise UsageError("a weighted total needs at least the weight coordinate")
        w = float(t[-1])
        if not w > 0:
            raise UsageError(
                f"the summed weight of {num_clients} clients is {w:g}: no positive weight "
                "to divide by"
            )
        return t[:-1] / w, w * self.weight_scale


def weighted_mean(
    vectors: Sequence[npt.ArrayLike], weights: Sequence[float] | None = None
) -> npt.NDArray[np.float64]:
    """Plaintext FedAvg, the reference: ``sum_k w_k x_k / sum_k w_k`` (uniform if
    ``weights`` is None)."""
    stacked = np.asarray([np.asarray(v, dtype=np.float64) for v in vectors])
    if stacked.ndim != 2 or stacked.shape[0] == 0:
        raise UsageError(f"need one or more vectors of equal length, got shape {stacked.shape}")
    w = np.ones(stacked.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (stacked.shape[0],) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise UsageError(f"need one finite weight >= 0 per vector, got {list(w)}")
    if not w.sum() > 0:
        raise UsageError("the weights sum to 0")
    mean: npt.NDArray[np.float64] = (w @ stacked) / w.sum()
    return mean


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class FedAvgResult:
    """A FedAvg round's outcome.

    ``mean``: the (noisy, with DP) weighted mean of the clients' vectors, float64, length d.
    ``total_weight``: the sum of the weights (``"examples"``) or the number of clients.
    ``num_clients``: clients counted. ``noise_stddev``: std of the noise in each coordinate
    of ``mean`` (None without DP). ``epsilon``, ``delta``, ``cumulative_epsilon``,
    ``cumulative_delta``: the round's and the run's privacy cost (None without DP).
    ``result``: the round's :class:`~mpc_agg.AggregateResult`.
    """

    mean: npt.NDArray[np.float64]
    total_weight: float
    num_clients: int
    noise_stddev: float | None
    epsilon: float | None
    delta: float | None
    cumulative_epsilon: float | None
    cumulative_delta: float | None
    result: AggregateResult


def open_fedavg_round(
    collector: Collector,
    round_id: str,
    model_dim: int,
    scheme: FedAvgScheme,
    *,
    min_clients: int | None = None,
) -> None:
    """Open ``round_id`` on every aggregator for updates of ``model_dim`` values."""
    collector.open_round(round_id, scheme.submitted_dim(model_dim), min_clients=min_clients)


async def open_fedavg_round_async(
    collector: Collector,
    round_id: str,
    model_dim: int,
    scheme: FedAvgScheme,
    *,
    min_clients: int | None = None,
) -> None:
    """Asynchronous :func:`open_fedavg_round`."""
    await collector.open_round_async(
        round_id, scheme.submitted_dim(model_dim), min_clients=min_clients
    )


def submit_update(
    client: Client,
    round_id: str,
    update: npt.ArrayLike,
    weight: float = 1.0,
    *,
    scheme: FedAvgScheme,
) -> SubmitReceipt:
    """Submit one client's ``update`` with ``weight`` to ``round_id`` as ``scheme`` says."""
    vector = scheme.contribution(update, weight, client.topology.encoding)
    return client.submit(round_id, vector)


async def submit_update_async(
    client: Client,
    round_id: str,
    update: npt.ArrayLike,
    weight: float = 1.0,
    *,
    scheme: FedAvgScheme,
) -> SubmitReceipt:
    """Asynchronous :func:`submit_update`."""
    vector = scheme.contribution(update, weight, client.topology.encoding)
    return await client.submit_async(round_id, vector)


def aggregate_updates(
    collector: Collector, round_id: str, *, scheme: FedAvgScheme, timeout: float = 120.0
) -> FedAvgResult:
    """Close ``round_id``, reveal the total and average it as ``scheme`` says.

    Raises what :meth:`~mpc_agg.Collector.aggregate` raises (:class:`~mpc_agg.RoundFailed`
    when too few clients submitted or the privacy budget is spent, ...).
    """
    return _averaged(collector.aggregate(round_id, timeout=timeout), scheme)


async def aggregate_updates_async(
    collector: Collector, round_id: str, *, scheme: FedAvgScheme, timeout: float = 120.0
) -> FedAvgResult:
    """Asynchronous :func:`aggregate_updates`."""
    return _averaged(await collector.aggregate_async(round_id, timeout=timeout), scheme)


def _averaged(result: AggregateResult, scheme: FedAvgScheme) -> FedAvgResult:
    mean, total_weight = scheme.average(result.total, result.num_clients)
    noise = None
    if result.noise_stddev is not None:
        # Uniform weighting divides by the exact client count; with weights, dividing by
        # the (noisy) summed weight is the first-order estimate.
        noise = result.noise_stddev / (
            total_weight if scheme.weighting == "uniform" else total_weight / scheme.weight_scale
        )
    return FedAvgResult(
        mean=mean,
        total_weight=total_weight,
        num_clients=result.num_clients,
        noise_stddev=noise,
        epsilon=result.epsilon,
        delta=result.delta,
        cumulative_epsilon=result.cumulative_epsilon,
        cumulative_delta=result.cumulative_delta,
        result=result,
    )
