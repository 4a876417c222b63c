"""The in-process Flower runner: real ServerApp / ClientApp (and mods) over InProcessGrid.

Checks that messages round-trip with correct ids, that each node keeps one context across
rounds, that FedAvg's aggregate matches a weighted mean computed here, that Flower's own
SecAgg+ workflow and mod run through the grid, and that client failures become Error
replies.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from mpc_agg.errors import UsageError  # noqa: E402
from mpc_agg.integrations.flower_local import (  # noqa: E402
    NODE_ID_OFFSET,
    InProcessGrid,
    run_inprocess,
    run_server_app,
)

NUM_NODES = 3
NUM_ROUNDS = 2
INITIAL = np.array([0.5, -1.0, 2.0, 0.0, 3.25])


def weight(partition_id: int) -> int:
    """The ``num-examples`` node ``partition_id`` reports, so FedAvg's weights differ."""
    return partition_id + 1


def counting_client_app() -> tuple[ClientApp, list[tuple[int, str, int, str]]]:
    """A ClientApp returning ``received + partition id``, and its log of (node, type, ...).

    Each log entry is (node id, message type, calls so far in this node's context state,
    the instruction's message id).
    """
    app = ClientApp()
    seen: list[tuple[int, str, int, str]] = []

    def bump(context: Context) -> int:
        counters = context.state.config_records.setdefault("counters", ConfigRecord())
        counters["calls"] = int(counters.get("calls", 0)) + 1
        return int(counters["calls"])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls = bump(context)
        seen.append((context.node_id, msg.metadata.message_type, calls, msg.metadata.message_id))
        pid = int(context.node_config["partition-id"])
        (received,) = msg.content["arrays"].to_numpy_ndarrays()
        metrics = MetricRecord({"num-examples": weight(pid), "calls": calls})
        content = RecordDict(
            {"arrays": ArrayRecord([received + pid]), "metrics": metrics},
        )
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        calls = bump(context)
        seen.append((context.node_id, msg.metadata.message_type, calls, msg.metadata.message_id))
        pid = int(context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": weight(pid), "calls": calls})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app, seen


def fedavg_server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(min_available_nodes=NUM_NODES)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([INITIAL]),
            num_rounds=int(context.run_config["num-rounds"]),
        )
        context.state.array_records["final"] = result.arrays

    return app


def test_fedavg_two_rounds_matches_weighted_mean() -> None:
    client_app, seen = counting_client_app()
    grid = InProcessGrid(client_app, NUM_NODES, run_config={"num-rounds": NUM_ROUNDS})
    context = run_server_app(fedavg_server_app(), grid)

    # FedAvg, computed here: x <- sum_i w_i (x + i) / sum_i w_i, once per round.
    expected = INITIAL.copy()
    weights = np.array([weight(pid) for pid in range(NUM_NODES)], dtype=float)
    for _ in range(NUM_ROUNDS):
        expected = (weights[:, None] * (expected + np.arange(NUM_NODES)[:, None])).sum(0)
        expected /= weights.sum()
    (final,) = context.state.array_records["final"].to_numpy_ndarrays()
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-12)

    # The server's context is the one run_server_app made and returned.
    assert context.node_id == SUPERLINK_NODE_ID
    assert context.run_config == {"num-rounds": NUM_ROUNDS}

    # Every node got train, evaluate, train, evaluate; its context counted all four.
    node_ids = list(range(NODE_ID_OFFSET, NODE_ID_OFFSET + NUM_NODES))
    assert list(grid.get_node_ids()) == node_ids
    for node_id in node_ids:
        mine = [(kind, calls) for nid, kind, calls, _ in seen if nid == node_id]
        assert mine == [
            (MessageType.TRAIN, 1),
            (MessageType.EVALUATE, 2),
            (MessageType.TRAIN, 3),
            (MessageType.EVALUATE, 4),
        ]
        node_context = grid.node_contexts[node_id]
        assert node_context.state.config_records["counters"]["calls"] == 4
        assert node_context.node_config == {
            "partition-id": node_id - NODE_ID_OFFSET,
            "num-partitions": NUM_NODES,
        }
    assert grid.client_seconds > 0
    # Message ids are set before delivery and unique.
    ids = [message_id for *_, message_id in seen]
    assert all(ids) and len(set(ids)) == len(ids)


def test_run_inprocess_returns_server_context_and_extra_node_config() -> None:
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        record = ConfigRecord({"pid": context.node_config["partition-id"]})
        record["label"] = context.node_config["label"]
        record["seed"] = context.run_config["seed"]
        return Message(RecordDict({"out": record}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        sent = [
            Message(RecordDict(), node_id, MessageType.QUERY, group_id="q")
            for node_id in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(sent))
        assert [r.metadata.reply_to_message_id for r in replies] == [
            m.metadata.message_id for m in sent
        ]
        assert [r.metadata.src_node_id for r in replies] == [m.metadata.dst_node_id for m in sent]
        assert all(r.metadata.dst_node_id == SUPERLINK_NODE_ID for r in replies)
        assert all(r.metadata.group_id == "q" for r in replies)
        outs = [r.content["out"] for r in replies]
        context.state.config_records["seen"] = ConfigRecord(
            {
                "pids": [int(o["pid"]) for o in outs],
                "labels": [str(o["label"]) for o in outs],
                "seeds": [int(o["seed"]) for o in outs],
            }
        )
        # Replies are pulled once.
        assert list(grid.pull_messages([m.metadata.message_id for m in sent])) == []

    context = run_inprocess(
        server,
        app,
        2,
        run_config={"seed": 7},
        node_config=lambda pid: {"label": f"site-{pid}"},
    )
    seen = context.state.config_records["seen"]
    assert seen["pids"] == [0, 1]
    assert seen["labels"] == ["site-0", "site-1"]
    assert seen["seeds"] == [7, 7]


def test_messages_are_copied_and_failures_become_error_replies() -> None:
    """One shared RecordDict to all nodes: a node that pops a key must not affect others."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        value = msg.content.config_records["cfg"].pop("stage")  # as secaggplus_mod does
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("node 1 fails on purpose")
        return Message(RecordDict({"cfg": ConfigRecord({"stage": value})}), reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        shared = RecordDict({"cfg": ConfigRecord({"stage": "setup"})})
        replies = grid.send_and_receive(
            [Message(shared, nid, MessageType.TRAIN, group_id="1") for nid in grid.get_node_ids()]
        )
        record = ConfigRecord()
        record["errors"] = [r.error.code if r.has_error() else -1 for r in replies]
        record["stages"] = [
            str(r.content["cfg"]["stage"]) if r.has_content() else "" for r in replies
        ]
        record["kept"] = str(shared.config_records["cfg"]["stage"])
        context.state.config_records["out"] = record

    out = run_inprocess(server, app, 3).state.config_records["out"]
    assert out["errors"] == [-1, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, -1]
    assert out["stages"] == ["setup", "", "setup"]
    assert out["kept"] == "setup"


def test_secaggplus_workflow_and_mod_sum() -> None:
    """Flower's SecAggPlusWorkflow + secaggplus_mod aggregate through the grid."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    num_nodes, dim = 4, 6
    vectors = np.random.default_rng(5).uniform(-1, 1, size=(num_nodes, dim))

    class Contributor(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):  # Flower's NumPyClient signature
            return [vectors[self.pid]], 1, {}

    client_app = ClientApp(
        client_fn=lambda context: Contributor(int(context.node_config["partition-id"])).to_client(),
        mods=[secaggplus_mod],
    )

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = LegacyFedAvg(
            fraction_evaluate=0.0,
            min_fit_clients=num_nodes,
            min_available_clients=num_nodes,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim)]),
        )
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, max_weight=1.0)
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    grid = InProcessGrid(client_app, num_nodes)
    context = run_server_app(server_app, grid)
    (mean,) = context.state.array_records["parameters"].to_numpy_ndarrays()
    step = 2 * 8.0 / 2**22  # Flower's default clipping range and quantization levels
    np.testing.assert_allclose(mean * num_nodes, vectors.sum(0), rtol=0, atol=num_nodes * step)
    # The mod keeps its protocol state in each node's own context.
    for node_context in grid.node_contexts.values():
        assert RECORD_KEY_STATE in node_context.state.config_records


def test_push_refuses_bad_messages() -> None:
    grid = InProcessGrid(ClientApp(), 2)
    server = ServerApp()
    problems: list[str] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for dst in (NODE_ID_OFFSET + 2, SUPERLINK_NODE_ID):
            try:
                grid.push_messages([Message(RecordDict(), dst, MessageType.QUERY)])
            except UsageError as exc:
                problems.append(str(exc))

    run_server_app(server, grid)
    assert len(problems) == 2
    assert all("dst_node_id" in p for p in problems)

    with pytest.raises(UsageError, match="num_nodes"):
        InProcessGrid(ClientApp(), 0)
