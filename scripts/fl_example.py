#!/usr/bin/env python
"""Federated learning with secure aggregation: a Flower app whose FedAvg runs through mpc_agg.

    python scripts/fl_example.py [--rounds 5] [--clients 10] [--config configs/local-3.yaml]
                                 [--dp-config configs/dp-gaussian-3.yaml | --no-dp] [--seed 0]

Trains a softmax (multinomial logistic) regression on scikit-learn's bundled digits data
(8x8 images, 10 classes; no download) split among ``--clients`` Flower clients, three ways,
with the same seed and the same client code:

* plaintext: Flower's own ``FedAvg``; every client sends its model to the server;
* mpc_agg: ``MpcFedAvg`` on the topology of ``--config``; each client's update goes as
  secret shares to the aggregators, the Flower server sees only the weighted sum;
* mpc_agg + DP: ``MpcFedAvg`` on ``--dp-config``; the sum carries distributed discrete
  Gaussian noise and every round spends privacy budget (uniform weighting, updates clipped
  to l2_clip).

The Flower server and clients run in this process (``mpc_agg.integrations.flower_local``:
no Ray, no SuperLink); the aggregators are real processes on 127.0.0.1, started here for each
topology and stopped afterwards. They run in a temporary directory, with throw-away keys and
tokens the launcher provisions there (so ``--config`` and ``--dp-config`` are templates,
without keys), and every run starts with empty journals and a fresh privacy budget (a real
deployment keeps its ledger).
Prints one line per round: test accuracy of each run, and the privacy spent so far. Progress
goes to stderr, the table to stdout.

The training functions (:func:`load_federated_digits`, :func:`local_train`,
:func:`run_fedavg`) are importable; the test suite reuses them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from mpc_agg import Topology
    from mpc_agg.provision import LocalDeployment

ROOT = Path(__file__).resolve().parent.parent

Model = dict[str, npt.NDArray[np.float64]]


# --------------------------------------------------------------------------- data and model


@dataclass(frozen=True)
class FederatedDigits:
    """The digits data: one (features, labels) training partition per client, and a
    held-out test set. Features are pixel intensities scaled to [0, 1] (64 per image)."""

    partitions: tuple[tuple[np.ndarray, np.ndarray], ...]
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.x_test.shape[1])


NUM_CLASSES = 10


def load_federated_digits(clients: int, seed: int) -> FederatedDigits:
    """Split scikit-learn's digits into a 25 % test set and ``clients`` training partitions
    of unequal sizes (so FedAvg's weights matter), shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = len(y) // 4
    test, train = order[:n_test], order[n_test:]
    # Unequal partition sizes: proportions from a Dirichlet, at least 20 examples each.
    floor = 20
    if clients < 1 or clients * floor > len(train):
        raise ValueError(f"clients must be in 1..{len(train) // floor}, got {clients}")
    spare = len(train) - clients * floor
    sizes = floor + np.floor(rng.dirichlet(np.full(clients, 2.0)) * spare).astype(int)
    sizes[-1] += len(train) - sizes.sum()
    cuts = np.cumsum(sizes)[:-1]
    parts = tuple((x[idx], y[idx]) for idx in np.split(train, cuts))
    return FederatedDigits(parts, x[test], y[test])


def initial_model(num_features: int) -> Model:
    """Zero weights and biases: the same starting point for every run."""
    return {"W": np.zeros((num_features, NUM_CLASSES)), "b": np.zeros(NUM_CLASSES)}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def local_train(
    model: Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> tuple[Model, float]:
    """Minibatch SGD on the cross-entropy from ``model``; the trained model and the last
    epoch's mean loss. Deterministic given ``rng``."""
    w, b = model["W"].copy(), model["b"].copy()
    onehot = np.eye(NUM_CLASSES)[y]
    loss = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        losses = []
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            p = _softmax(x[idx] @ w + b)
            losses.append(-np.mean(np.log(p[np.arange(len(idx)), y[idx]] + 1e-12)))
            g = (p - onehot[idx]) / len(idx)
            w -= lr * (x[idx].T @ g)
            b -= lr * g.sum(axis=0)
        loss = float(np.mean(losses))
    return {"W": w, "b": b}, loss


def accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float(np.mean(np.argmax(x @ model["W"] + model["b"], axis=1) == y))


# --------------------------------------------------------------------------- Flower apps


@dataclass(frozen=True)
class Training:
    """Hyperparameters shared by every run."""

    rounds: int = 5
    local_epochs: int = 2
    lr: float = 0.5
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class RunResult:
    """Test accuracy after each round (index 0: the initial model), and with DP the
    cumulative epsilon after each round (at the budget's delta)."""

    accuracy: tuple[float, ...]
    cumulative_epsilon: tuple[float, ...] | None = None
    epsilon_per_round: float | None = None
    delta: float | None = None
    seconds: float = 0.0
    stopped: str | None = None
    """Why the run ended early (the privacy budget), or None."""


def make_client_app(data: FederatedDigits, training: Training, mods: Sequence = ()):
    """The Flower ClientApp: trains locally on its partition, replies arrays and metrics,
    exactly as for plain FedAvg. ``mods``: e.g. ``[secure_train_mod(topology)]``."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = data.partitions[pid]
        server_round = int(msg.content["config"]["server-round"])
        model = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        rng = np.random.default_rng([training.seed, server_round, pid])
        trained, loss = local_train(
            model,
            x,
            y,
            epochs=training.local_epochs,
            lr=training.lr,
            batch_size=training.batch_size,
            rng=rng,
        )
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in trained.items()})
        metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def client_id(context) -> str:
    """The mpc_agg client id of the Flower node running ``context``: its partition."""
    return f"digits-{int(context.node_config['partition-id'])}"


def run_fedavg(
    data: FederatedDigits,
    training: Training,
    deployment: LocalDeployment | None = None,
    *,
    round_prefix: str | None = None,
) -> RunResult:
    """Run FedAvg in process for ``training.rounds`` rounds; evaluate on the test set after
    each round. ``deployment``: None for Flower's plaintext ``FedAvg``, else the mpc_agg
    deployment whose aggregators are running (``LocalFederation.deployment``): its topology
    and tokens give ``MpcFedAvg`` on the server the collector's tokens and
    ``secure_train_mod`` on each client the tokens issued for its client id."""
    from flwr.app import Array, ArrayRecord, MetricRecord
    from flwr.serverapp import ServerApp
    from flwr.serverapp.exception import PrivacyBudgetExhausted
    from flwr.serverapp.strategy import FedAvg

    from mpc_agg.integrations.flower_local import run_inprocess

    n = len(data.partitions)
    common = {"fraction_evaluate": 0.0, "min_available_nodes": n, "min_train_nodes": n}
    mods: list = []
    topology: Topology | None = None
    if deployment is None:
        strategy = FedAvg(**common)
    else:
        topology = deployment.topology()
        from mpc_agg.integrations.flower import MpcFedAvg, secure_train_mod

        secure = not topology.insecure
        strategy = MpcFedAvg(
            topology,
            collector_token=deployment.collector_tokens() if secure else None,
            round_prefix=round_prefix,
            **common,
        )
        tokens = deployment.client_tokens
        mods = [
            secure_train_mod(
                topology,
                client_id=client_id,
                token=lambda context: tokens(client_id(context)) if secure else None,
            )
        ]

    accuracies: dict[int, float] = {}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = {k: a.numpy() for k, a in arrays.items()}
        accuracies[server_round] = accuracy(model, data.x_test, data.y_test)
        return MetricRecord({"accuracy": accuracies[server_round]})

    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        init = initial_model(data.num_features)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(v) for k, v in init.items()}),
            num_rounds=training.rounds,
            evaluate_fn=evaluate,
        )

    started = time.perf_counter()
    stopped = None
    try:
        run_inprocess(server, make_client_app(data, training, mods), n)
    except PrivacyBudgetExhausted as exc:  # MpcFedAvg stops the run: later rounds would fail
        stopped = str(exc)
    seconds = time.perf_counter() - started
    acc = tuple(accuracies[r] for r in range(training.rounds + 1) if r in accuracies)
    if topology is None or topology.dp is None:
        return RunResult(acc, seconds=seconds, stopped=stopped)
    history = strategy.history
    eps = tuple(float(history[r].cumulative_epsilon) for r in sorted(history))
    return RunResult(acc, eps, topology.dp.epsilon, topology.dp.budget_delta, seconds, stopped)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Federated training of a softmax regression on scikit-learn's digits with Flower: "
            "plaintext FedAvg next to FedAvg through mpc_agg's aggregators, without and with "
            "differential privacy. Starts and stops the aggregator processes itself."
        ),
        epilog=(
            "Prints to stdout one line per round: test accuracy of plaintext FedAvg, of "
            "FedAvg through mpc_agg (--config) and through mpc_agg with DP (--dp-config), and "
            "the epsilon spent so far; progress goes to stderr. The aggregators of each "
            "topology listen on its ports on 127.0.0.1 and run in a temporary directory (fresh "
            "journals and privacy budget every run) with throw-away keys and tokens the "
            "launcher provisions there; the topologies must be templates (no keys)."
        ),
    )
    parser.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    parser.add_argument("--clients", type=int, default=10, help="Flower clients (default 10)")
    parser.add_argument(
        "--config",
        default=str(ROOT / "configs" / "local-3.yaml"),
        help="topology for the mpc_agg run without DP (default configs/local-3.yaml)",
    )
    parser.add_argument(
        "--dp-config",
        default=str(ROOT / "configs" / "fl-dp-3.yaml"),
        help="topology with a dp section for the DP run (default configs/fl-dp-3.yaml)",
    )
    parser.add_argument("--no-dp", action="store_true", help="skip the DP run")
    parser.add_argument("--seed", type=int, default=0, help="data split and training seed")
    parser.add_argument("--local-epochs", type=int, default=2, help="epochs per round (2)")
    parser.add_argument("--lr", type=float, default=0.5, help="local learning rate (0.5)")
    parser.add_argument(
        "--verbose", action="store_true", help="show Flower's and the aggregators' logs"
    )
    return parser.parse_args(argv)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_on_federation(
    config: str, data: FederatedDigits, training: Training, verbose: bool, label: str
) -> RunResult:
    """Start the aggregators of ``config`` in a temporary directory, run FedAvg through
    them, stop them."""
    from mpc_agg.launcher import LocalFederation, describe

    with tempfile.TemporaryDirectory(prefix="mpc_agg-fl-") as workdir:
        federation = LocalFederation(
            config,
            log_level="info" if verbose else "error",
            output=sys.stderr,
            cwd=workdir,
            data_dir=Path(workdir) / "data",  # keys, journals and a fresh ledger: throw-away
        )
        progress(f"[{label}] starting {describe(federation.topology)} ...")
        with federation:
            progress(f"[{label}] aggregators ready; training {training.rounds} rounds ...")
            result = run_fedavg(data, training, federation.deployment)
        progress(f"[{label}] done in {result.seconds:.1f} s; aggregators stopped")
    return result


def _cell(values: Sequence[float], r: int, fmt: str, width: int) -> str:
    return f"{values[r]:>{width}{fmt}}" if r < len(values) else f"{'-':>{width}}"


def print_table(args: argparse.Namespace, plain, secure, dp, dp_topology) -> None:
    """The per-round table (stdout)."""
    print(
        f"FedAvg on digits, {args.clients} clients, {args.rounds} rounds, seed {args.seed}: "
        "test accuracy after each round"
    )
    header = f"{'round':>5}  {'plaintext':>9}  {'mpc_agg':>9}"
    if dp is not None:
        header += f"  {'mpc_agg+DP':>10}  {'epsilon spent':>13}"
    print(header)
    for r in range(args.rounds + 1):
        line = (
            f"{r:>5}  {_cell(plain.accuracy, r, '.3f', 9)}  {_cell(secure.accuracy, r, '.3f', 9)}"
        )
        if dp is not None:
            spent = (0.0, *dp.cumulative_epsilon) if dp.cumulative_epsilon else (0.0,)
            line += f"  {_cell(dp.accuracy, r, '.3f', 10)}  {_cell(spent, r, '.3f', 13)}"
        print(line)
    pairs = list(zip(plain.accuracy, secure.accuracy, strict=False))
    gap = max(abs(a - b) for a, b in pairs)
    print(f"largest accuracy gap, plaintext vs mpc_agg: {100 * gap:.2f} points")
    if dp is not None:
        d = dp_topology.dp
        print(
            f"mpc_agg+DP: {d.mechanism} noise for epsilon {d.epsilon:g} per round "
            f"(delta {d.delta:g}), updates clipped to L2 norm {d.l2_clip:g}, uniform weights; "
            f"epsilon spent is cumulative at delta {d.budget_delta:g} (budget {d.budget_epsilon:g})"
        )
        print(
            "  (the DP noise comes from the aggregators' CSPRNG, not from --seed: that column "
            "changes from run to run)"
        )
        if dp.stopped:
            print(f"mpc_agg+DP stopped early: {dp.stopped}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rounds < 1 or args.clients < 2:
        print("error: --rounds must be >= 1 and --clients >= 2", file=sys.stderr)
        return 2
    from mpc_agg import MpcAggError, Topology
    from mpc_agg.launcher import LaunchError

    if not args.verbose:
        import flwr.app  # noqa: F401  (flwr sets its logger's level on import: quiet it after)

        logging.getLogger("flwr").setLevel(logging.ERROR)
    try:
        topologies = [Topology.load(args.config)]
        if not args.no_dp:
            dp_topology = Topology.load(args.dp_config)
            if dp_topology.dp is None:
                print(f"error: {args.dp_config} has no dp section", file=sys.stderr)
                return 2
            topologies.append(dp_topology)
    except MpcAggError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for topo in topologies:
        if topo.has_keys:
            print(
                f"error: {topo.source}: this example starts its own aggregators with "
                "throw-away keys: give a template topology (without keys)",
                file=sys.stderr,
            )
            return 2
    training = Training(
        rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr, seed=args.seed
    )
    try:
        data = load_federated_digits(args.clients, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes = [len(y) for _, y in data.partitions]
    progress(
        f"digits: {sum(sizes)} training examples over {args.clients} clients "
        f"(sizes {min(sizes)}..{max(sizes)}), {len(data.y_test)} test examples"
    )
    progress("[plaintext] Flower FedAvg, updates sent to the server in the clear ...")
    plain = run_fedavg(data, training)
    progress(f"[plaintext] done in {plain.seconds:.1f} s")
    try:
        secure = run_on_federation(args.config, data, training, args.verbose, "mpc_agg")
        dp = None
        if not args.no_dp:
            dp = run_on_federation(args.dp_config, data, training, args.verbose, "mpc_agg+DP")
    except (MpcAggError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print_table(args, plain, secure, dp, topologies[1] if dp is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
