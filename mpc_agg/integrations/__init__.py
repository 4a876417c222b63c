"""Bridges from machine-learning frameworks to mpc_agg.

* :mod:`mpc_agg.integrations.model`: a model's arrays or tensors <-> one float64 vector
  (:func:`flatten`, :class:`ModelLayout`).
* :mod:`mpc_agg.integrations.fedavg`: weighted federated averaging over mpc_agg rounds
  (:class:`FedAvgScheme`, :func:`submit_update`, :func:`aggregate_updates`).
* :mod:`mpc_agg.integrations.flower`: the Flower adapter (:class:`MpcFedAvg` on the server,
  :func:`secure_train_mod` on the clients), configured from Flower's run and node config
  (``mpc-agg-*`` keys) or from arguments; needs the ``flower`` extra.

Importing this package imports neither ``flwr`` nor ``torch``: the Flower names below are
loaded on first use, and tensors are recognised only if the caller has imported torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mpc_agg.errors import LayoutError
from mpc_agg.integrations.fedavg import (
    FedAvgResult,
    FedAvgScheme,
    aggregate_updates,
    aggregate_updates_async,
    open_fedavg_round,
    open_fedavg_round_async,
    submit_update,
    submit_update_async,
    weighted_mean,
)
from mpc_agg.integrations.model import EntrySpec, ModelLayout, flatten, unflatten

if TYPE_CHECKING:
    from mpc_agg.integrations.flower import MpcFedAvg, secure_train_mod

_FLOWER_NAMES = {"MpcFedAvg", "secure_train_mod"}

__all__ = [
    "EntrySpec",
    "FedAvgResult",
    "FedAvgScheme",
    "LayoutError",
    "ModelLayout",
    "MpcFedAvg",
    "aggregate_updates",
    "aggregate_updates_async",
    "flatten",
    "open_fedavg_round",
    "open_fedavg_round_async",
    "secure_train_mod",
    "submit_update",
    "submit_update_async",
    "unflatten",
    "weighted_mean",
]


def __getattr__(name: str) -> Any:
    """Load the Flower adapter (and ``flwr``) only when one of its names is used."""
    if name in _FLOWER_NAMES:
        module = importlib.import_module("mpc_agg.integrations.flower")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
