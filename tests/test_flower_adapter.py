"""The Flower adapter against real aggregator processes: MpcFedAvg on the server,
secure_train_mod on the clients, Flower's ServerApp and ClientApps run in process.

Checks that a multi-round run gives FedAvg's model (exactly the weighted mean, up to the
encoding's resolution), that no reply reaching the Flower server carries arrays, that a
client refuses to train for a plain FedAvg server, that topology, grants (hence client id)
and secret can come from Flower's node and run config, and that the FL example's accuracy
through mpc_agg matches plaintext FedAvg's. Config resolution alone: test_flower_config.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.serverapp.exception import PrivacyBudgetExhausted  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from mpc_agg import Topology  # noqa: E402
from mpc_agg.credentials import issue_client_grant, issue_collector_grant  # noqa: E402
from mpc_agg.errors import UsageError  # noqa: E402
from mpc_agg.integrations import FedAvgScheme, flatten  # noqa: E402
from mpc_agg.integrations.flower import (  # noqa: E402
    MpcFedAvg,
    record_to_vector,
    secure_train_mod,
    vector_to_record,
)
from mpc_agg.integrations.flower_local import InProcessGrid, run_server_app  # noqa: E402
from mpc_agg.launcher import LocalFederation  # noqa: E402

from .conftest import ROOT, dp_topology_doc, topology_doc, write_topology  # noqa: E402

NUM_NODES = 4
INITIAL = {
    "w": np.array([[0.5, -1.0, 2.0], [0.0, 3.25, -0.5]], dtype=np.float32),
    "b": np.array([0.25, -0.75]),
}


def target(partition_id: int) -> dict[str, np.ndarray]:
    """What node ``partition_id`` moves the model by in every round."""
    rng = np.random.default_rng(partition_id)
    return {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=2)}


def num_examples(partition_id: int) -> int:
    return 10 * (partition_id + 1)


def to_record(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()})


def stepping_client_app(mods: list, keep_dtypes: bool = True) -> ClientApp:
    """Each node replies ``global + target(pid)`` with ``num-examples`` (plain FedAvg code),
    in the global arrays' dtypes or (``keep_dtypes=False``) in float64."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        model = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        step = target(pid)
        trained = {k: model[k].astype(float) + step[k] for k in model}
        if keep_dtypes:
            trained = {k: v.astype(model[k].dtype) for k, v in trained.items()}
        metrics = MetricRecord({"num-examples": num_examples(pid), "loss": float(pid)})
        return Message(RecordDict({"arrays": to_record(trained), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": num_examples(pid), "acc": 0.5})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


class RecordingGrid(InProcessGrid):
    """An InProcessGrid that keeps every reply the server pulls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Message] = []

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        self.seen.extend(replies)
        return replies


def run(strategy, client_app: ClientApp, rounds: int) -> tuple[dict, RecordingGrid]:
    """Run ``strategy`` for ``rounds`` over NUM_NODES in-process nodes; (result, grid)."""
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        out["result"] = strategy.start(
            grid=grid, initial_arrays=to_record(INITIAL), num_rounds=rounds
        )

    grid = RecordingGrid(client_app, NUM_NODES)
    run_server_app(server, grid)
    return out, grid


def expected_after(rounds: int) -> dict[str, np.ndarray]:
    """FedAvg's model: each round adds the num-examples-weighted mean step."""
    w = np.array([num_examples(p) for p in range(NUM_NODES)], dtype=float)
    mean = {
        k: sum(w[p] * target(p)[k].astype(float) for p in range(NUM_NODES)) / w.sum()
        for k in INITIAL
    }
    return {k: INITIAL[k].astype(float) + rounds * mean[k] for k in INITIAL}


def node_client_id(context: Context) -> str:
    """The mpc_agg client id of a Flower node (secure_train_mod's default)."""
    return f"flwr-node-{context.node_id}"


def strategy_for(fed, **kwargs) -> MpcFedAvg:
    """MpcFedAvg on the running federation ``fed``, with the collector's tokens."""
    return MpcFedAvg(fed.topology, collector_token=fed.deployment.collector_tokens(), **kwargs)


def mod_for(fed, topology: Topology | None = None):
    """secure_train_mod for the running federation ``fed``: each node submits with the
    tokens its aggregators issued for its client id."""
    return secure_train_mod(
        fed.topology if topology is None else topology,
        client_id=node_client_id,
        token=lambda context: fed.deployment.client_tokens(node_client_id(context)),
    )


pytestmark = pytest.mark.processes


def test_two_flower_rounds_through_real_aggregators(federation3, round_id: str) -> None:
    strategy = strategy_for(
        federation3, round_prefix=round_id, min_available_nodes=NUM_NODES, fraction_evaluate=1.0
    )
    # The clients reply float64 arrays for the float32 "w": the server keeps its dtype.
    app = stepping_client_app([mod_for(federation3)], keep_dtypes=False)
    out, grid = run(strategy, app, rounds=2)
    result = out["result"]

    # The model is FedAvg's (weighted by num-examples), up to 2^-24 per client and round.
    final = result.arrays
    assert list(final.keys()) == ["w", "b"]
    assert final["w"].numpy().dtype == np.float32 and final["w"].numpy().shape == (2, 3)
    want = expected_after(2)
    np.testing.assert_allclose(final["w"].numpy(), want["w"], atol=1e-5)
    np.testing.assert_allclose(final["b"].numpy(), want["b"], atol=1e-6)

    # Nothing but metrics reached the Flower server from training.
    train_replies = [m for m in grid.seen if m.metadata.message_type == MessageType.TRAIN]
    assert len(train_replies) == 2 * NUM_NODES
    assert all(not m.has_error() for m in grid.seen)
    assert all(len(m.content.array_records) == 0 for m in train_replies)
    assert all("num-examples" in m.content["metrics"] for m in train_replies)

    # Each Flower round was one mpc_agg round of every client; metrics say so.
    for r in (1, 2):
        metrics = result.train_metrics_clientapp[r]
        assert metrics["mpc-num-clients"] == NUM_NODES
        assert metrics["mpc-total-weight"] == pytest.approx(100.0, abs=1e-5)
        assert metrics["loss"] == pytest.approx(sum(p * num_examples(p) for p in range(4)) / 100)
        assert "mpc-epsilon" not in metrics
        assert strategy.history[r].num_clients == NUM_NODES
        status = federation3.collector().status(strategy.round_id(r))
        assert all(s["state"] == "done" and s["num_clients"] == NUM_NODES for s in status)
        assert all(s["dim"] == 8 + 1 for s in status)  # the model and the weight
    # Evaluate messages pass through the mod untouched.
    evaluate_replies = [m for m in grid.seen if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluate_replies) == 2 * NUM_NODES
    assert all(m.content["metrics"]["acc"] == 0.5 for m in evaluate_replies)


def test_same_run_with_plain_fedavg_matches(federation3, round_id: str) -> None:
    """Flower's FedAvg on the same app gives the same model (the parity the adapter
    promises), and its clients do send arrays: the mod is what keeps them away."""
    plain_out, plain_grid = run(
        FedAvg(min_available_nodes=NUM_NODES, fraction_evaluate=0.0),
        stepping_client_app([]),
        rounds=2,
    )
    mpc_out, _ = run(
        strategy_for(
            federation3,
            round_prefix=round_id,
            min_available_nodes=NUM_NODES,
            fraction_evaluate=0.0,
        ),
        stepping_client_app([mod_for(federation3)]),
        rounds=2,
    )
    for k in INITIAL:
        np.testing.assert_allclose(
            mpc_out["result"].arrays[k].numpy(), plain_out["result"].arrays[k].numpy(), atol=1e-5
        )
    assert all(len(m.content.array_records) == 1 for m in plain_grid.seen)


def test_client_with_mod_refuses_a_plain_fedavg_server() -> None:
    """A train message that opened no mpc_agg round gets an error reply, never the arrays."""
    topology = Topology.from_dict(topology_doc(3, 1, insecure=True))  # never contacted
    _, grid = run(
        FedAvg(min_available_nodes=NUM_NODES, fraction_evaluate=0.0),
        stepping_client_app([secure_train_mod(topology)]),
        rounds=1,
    )
    assert len(grid.seen) == NUM_NODES
    for m in grid.seen:
        assert m.has_error() and not m.has_content()
        assert "opens no mpc_agg round" in m.error.reason


def test_client_refuses_another_topology_and_mismatched_arrays(federation3, round_id) -> None:
    other = Topology.from_dict(topology_doc(3, 1, name="other"))
    _, grid = run(
        strategy_for(
            federation3,
            round_prefix=round_id,
            min_available_nodes=NUM_NODES,
            fraction_evaluate=0.0,
        ),
        stepping_client_app([mod_for(federation3, other)]),
        rounds=1,
    )
    assert all(m.has_error() and "topology 'fed3'" in m.error.reason for m in grid.seen)

    app = ClientApp(mods=[mod_for(federation3)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        bad = to_record({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2)})
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": bad, "metrics": metrics}), reply_to=msg)

    _, grid = run(
        strategy_for(
            federation3,
            round_prefix=round_id + "-b",
            min_available_nodes=NUM_NODES,
            fraction_evaluate=0.0,
        ),
        app,
        rounds=1,
    )
    assert all(m.has_error() for m in grid.seen)
    assert "shape (3, 2) instead of (2, 3)" in grid.seen[0].error.reason


def test_server_ignores_arrays_from_clients_without_the_mod(
    federation3, round_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients without the mod send arrays to the server and nothing to the aggregators:
    the server uses none of them, the mpc_agg round fails (too few clients) and the global
    model stays as it was."""
    strategy = strategy_for(
        federation3,
        round_prefix=round_id,
        min_available_nodes=NUM_NODES,
        fraction_evaluate=0.0,
    )
    with caplog.at_level("INFO", logger="flwr"):
        out, _ = run(strategy, stepping_client_app([]), rounds=1)
    assert strategy.history == {}
    assert "sent arrays to the Flower server; ignored" in caplog.text
    assert "the global model is unchanged" in caplog.text
    assert len(out["result"].arrays) == 0  # Flower's Result: no aggregated arrays


def test_nodes_without_their_tokens_fail_before_uploading_or_are_refused(
    federation3, round_id: str
) -> None:
    """A node whose mod has no tokens fails at once, naming the node-config key; one with
    another client's tokens is refused by the aggregators. Either way its train reply is an
    error, and the server, which still holds the collector's tokens, leaves the model
    unchanged."""
    alice = federation3.deployment.client_tokens("alice")
    for token, reason in ((None, "mpc-agg-tokens: no tokens for this node"), (alice, "403")):
        strategy = strategy_for(
            federation3,
            round_prefix=f"{round_id}-{reason[:3]}",
            min_available_nodes=NUM_NODES,
            fraction_evaluate=0.0,
        )
        mod = secure_train_mod(federation3.topology, client_id=node_client_id, token=token)
        out, grid = run(strategy, stepping_client_app([mod]), rounds=1)
        assert len(grid.seen) == NUM_NODES
        assert all(m.has_error() and reason in m.error.reason for m in grid.seen), [
            m.error.reason for m in grid.seen
        ]
        assert strategy.history == {}
        assert len(out["result"].arrays) == 0


def test_settings_from_flower_config_with_pre_issued_grants(
    federation3, round_id: str, tmp_path: Path
) -> None:
    """The deployment way: each node's topology, grant files (so its client id) and secret
    come from its node config, the server's topology and collector grants from the run
    config, and the app code is ``MpcFedAvg.from_context(context)`` and
    ``secure_train_mod()``. The grants are issued ahead of time for ids that have nothing
    to do with Flower's node ids, as ``mpc-agg token`` does at each aggregator."""
    party_dirs = federation3.deployment.party_dirs
    topology = str(federation3.deployment.topology_path)
    collector_dir = tmp_path / "collector"
    collector_dir.mkdir()
    for d in party_dirs:
        grant = issue_collector_grant(d)
        grant.save(collector_dir / grant.default_name)
    run_config = {"mpc-agg-topology": topology, "mpc-agg-collector-tokens": str(collector_dir)}

    def node_config(partition_id: int) -> dict:
        node_dir = tmp_path / f"node-{partition_id}"
        (node_dir / "grants").mkdir(parents=True, exist_ok=True)
        for d in party_dirs:
            grant = issue_client_grant(d, f"site-{partition_id}")
            grant.save(node_dir / "grants" / grant.default_name, overwrite=True)
        return {
            "mpc-agg-topology": topology,
            "mpc-agg-tokens": str(node_dir / "grants"),
            "mpc-agg-secret": str(node_dir / "secret"),
        }

    def run_from_config(node_config, prefix: str) -> tuple[dict, RecordingGrid]:
        out: dict = {}
        server = ServerApp()

        @server.main()
        def main(grid, context: Context) -> None:
            out["strategy"] = strategy = MpcFedAvg.from_context(
                context, round_prefix=prefix, min_available_nodes=NUM_NODES, fraction_evaluate=0
            )
            out["result"] = strategy.start(
                grid=grid, initial_arrays=to_record(INITIAL), num_rounds=1
            )

        app = stepping_client_app([secure_train_mod()])
        grid = RecordingGrid(app, NUM_NODES, run_config=run_config, node_config=node_config)
        run_server_app(server, grid)
        return out, grid

    out, grid = run_from_config(node_config, round_id)
    assert all(not m.has_error() for m in grid.seen), [m.error.reason for m in grid.seen]
    assert out["strategy"].history[1].num_clients == NUM_NODES
    want = expected_after(1)
    for k in INITIAL:
        np.testing.assert_allclose(out["result"].arrays[k].numpy(), want[k], atol=1e-5)
    # Each node made its secret file (private) on first use.
    for p in range(NUM_NODES):
        assert (tmp_path / f"node-{p}" / "secret").stat().st_mode & 0o077 == 0

    # A node configured with an id other than its grants' fails before uploading.
    def mismatched(partition_id: int) -> dict:
        return {**node_config(partition_id), "mpc-agg-client-id": "someone-else"}

    out, grid = run_from_config(mismatched, round_id + "-b")
    assert len(grid.seen) == NUM_NODES and all(m.has_error() for m in grid.seen)
    reason = grid.seen[0].error.reason
    assert "mpc-agg-client-id" in reason and "issued for 'site-" in reason
    assert out["strategy"].history == {}


def two_round_budget(dim: int) -> float:
    """A budget between the cumulative epsilon of two and of three such rounds."""
    from mpc_agg.dp.accountant import cumulative_epsilon
    from mpc_agg.dp.planning import plan_noise

    topo = Topology.from_dict(dp_topology_doc("probe", 100.0))
    plan = plan_noise(topo.dp, topo.encoding, dim, topo.m)
    events = [plan.event(f"r{i}") for i in range(3)]
    two, three = (cumulative_epsilon(events[:k], 1e-4) for k in (2, 3))
    return (two + three) / 2


def test_dp_flower_run_spends_budget_and_stops_when_it_is_spent(tmp_path: Path) -> None:
    """With a dp section: uniform weights, clipped updates, noise and epsilon in the round
    metrics; the round that would exceed the budget stops the run (PrivacyBudgetExhausted)
    and leaves the model of the last revealed round."""
    config = write_topology(tmp_path, dp_topology_doc("fldp", two_round_budget(8)))
    with open(os.devnull, "w") as sink, LocalFederation(config, cwd=tmp_path, output=sink) as fed:
        strategy = strategy_for(fed, min_available_nodes=NUM_NODES, fraction_evaluate=0.0)
        server = ServerApp()
        out: dict = {}

        @server.main()
        def main(grid, context) -> None:
            out["result"] = strategy.start(
                grid=grid, initial_arrays=to_record(INITIAL), num_rounds=3
            )

        grid = RecordingGrid(stepping_client_app([mod_for(fed)]), NUM_NODES)
        with pytest.raises(PrivacyBudgetExhausted, match="over the budget"):
            run_server_app(server, grid)
    assert sorted(strategy.history) == [1, 2]
    first, second = strategy.history[1], strategy.history[2]
    assert strategy.scheme.weighting == "uniform"
    assert first.epsilon == 1.0 and first.num_clients == NUM_NODES
    assert (
        1.0 > first.cumulative_epsilon > 0 and second.cumulative_epsilon > first.cumulative_epsilon
    )
    assert first.noise_stddev == pytest.approx(first.result.noise_stddev / NUM_NODES)
    # The mean update is the mean of the clipped steps plus noise of the announced size.
    steps = [flatten(target(p))[0] for p in range(NUM_NODES)]
    clipped = np.mean([s / max(1.0, np.linalg.norm(s)) for s in steps], axis=0)
    for r in (first, second):
        assert np.all(np.abs(r.mean - clipped) < 6 * r.noise_stddev + 1e-6)
    assert all(len(m.content.array_records) == 0 for m in grid.seen)


def test_dp_topology_uses_uniform_weights_and_refuses_examples(tmp_path: Path) -> None:
    dp = Topology.load(ROOT / "configs" / "fl-dp-3.yaml")
    assert MpcFedAvg(dp).scheme == FedAvgScheme("uniform", 1.0)
    with pytest.raises(UsageError, match="noisy denominator"):
        MpcFedAvg(dp, weighting="examples")


def test_array_record_vector_round_trip() -> None:
    record = to_record(INITIAL)
    vector, layout = record_to_vector(record)
    assert vector.shape == (8,) and layout.names == ("w", "b")
    back = vector_to_record(vector, layout)
    for k in INITIAL:
        assert back[k].numpy().dtype == INITIAL[k].dtype
        np.testing.assert_array_equal(back[k].numpy(), INITIAL[k])
    assert np.array_equal(vector, flatten(INITIAL)[0])


# --------------------------------------------------------------------------- example parity


def load_example():
    spec = importlib.util.spec_from_file_location("fl_example", ROOT / "scripts" / "fl_example.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fl_example", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_example_accuracy_matches_plaintext_fedavg(federation3, round_id: str) -> None:
    """The FL example (10 clients, digits): through mpc_agg, without DP, every round's test
    accuracy is within 1 point of plaintext FedAvg with the same seed."""
    ex = load_example()
    data = ex.load_federated_digits(10, seed=1)
    training = ex.Training(rounds=3, seed=1)
    plain = ex.run_fedavg(data, training)
    secure = ex.run_fedavg(data, training, federation3.deployment, round_prefix=round_id)
    assert len(plain.accuracy) == len(secure.accuracy) == 4
    assert plain.accuracy[-1] > 0.85  # it learns
    for a, b in zip(plain.accuracy, secure.accuracy, strict=True):
        assert abs(a - b) <= 0.01, (plain.accuracy, secure.accuracy)
    assert secure.cumulative_epsilon is None and secure.stopped is None
