"""Where the Flower adapter takes its settings from: Flower's node and run config, then the
arguments (README, "Federated learning (Flower)").

Contexts are built in process (``flwr.app.Context`` with plain dicts); grant files are
written with :class:`~mpc_agg.credentials.TokenGrant`. No aggregator is contacted: the
topologies name free loopback ports nobody listens on.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from mpc_agg.credentials import TokenGrant  # noqa: E402
from mpc_agg.errors import ConfigError  # noqa: E402
from mpc_agg.integrations.flower import (  # noqa: E402
    NODE_KEYS,
    RUN_KEYS,
    MpcFedAvg,
    NodeSettings,
    node_settings,
    secure_train_mod,
)
from mpc_agg.integrations.flower_local import InProcessGrid, run_server_app  # noqa: E402

from .conftest import topology_doc, write_topology  # noqa: E402

ISSUER = "ab" * 32


def context(node: dict | None = None, run: dict | None = None, node_id: int = 7) -> Context:
    """A Flower context with these node and run configs."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=dict(node or {}),
        state=RecordDict(),
        run_config=dict(run or {}),
    )


def token_of(who: str, index: int) -> str:
    """A distinct 64-hex token for (who, aggregator index)."""
    return f"{abs(hash((who, index))):064x}"[-64:]


def write_grants(directory: Path, who: str | None, m: int = 3) -> Path:
    """``m`` grant files for client ``who`` (None: the collector) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(m):
        role = "client" if who is not None else "collector"
        grant = TokenGrant(role, who, i, ISSUER, token_of(who or "collector", i))
        grant.save(directory / grant.default_name)
    return directory


@pytest.fixture
def secure(tmp_path: Path) -> Path:
    """A 3-aggregator topology with HTTPS and tokens (absolute path)."""
    return write_topology(tmp_path, topology_doc(3, 1, name="fed"))


@pytest.fixture
def insecure(tmp_path: Path) -> Path:
    """A 3-aggregator ``insecure`` topology (no tokens)."""
    return write_topology(tmp_path, topology_doc(3, 1, name="open", insecure=True))


def test_keys_are_the_documented_ones() -> None:
    assert NODE_KEYS == (
        "mpc-agg-topology",
        "mpc-agg-client-id",
        "mpc-agg-tokens",
        "mpc-agg-secret",
    )
    assert RUN_KEYS == ("mpc-agg-topology", "mpc-agg-collector-tokens")


# --------------------------------------------------------------------------- topology


def test_topology_from_node_config_then_run_config_then_argument(
    secure: Path, insecure: Path, tmp_path: Path
) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    node = {"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}
    # The node config wins over the run config and the argument.
    got = node_settings(context(node, {"mpc-agg-topology": str(insecure)}), insecure)
    assert got.topology.name == "fed"
    # Without it, the run config's.
    got = node_settings(context({}, {"mpc-agg-topology": str(insecure)}), secure)
    assert got.topology.name == "open"
    # Without either, the argument (a path or a Topology).
    assert node_settings(context(), str(insecure)).topology.name == "open"
    assert node_settings(context(), got.topology).topology is got.topology


def test_missing_topology_names_the_key_and_where_to_set_it() -> None:
    with pytest.raises(ConfigError) as info:
        node_settings(context())
    message = str(info.value)
    assert info.value.path == "mpc-agg-topology"
    assert "flower-supernode --node-config" in message
    assert "[tool.flwr.app.config]" in message
    assert "secure_train_mod(topology)" in message


@pytest.mark.parametrize("where", ["node", "run"])
def test_relative_paths_in_flower_config_are_refused(where: str) -> None:
    config = {"mpc-agg-topology": "configs/local-3.yaml"}
    ctx = context(config, None) if where == "node" else context(None, config)
    with pytest.raises(ConfigError, match="relative path; give an absolute one") as info:
        node_settings(ctx)
    assert str(info.value).startswith(f"Flower {where} config: mpc-agg-topology:")


def test_non_string_config_values_are_refused(secure: Path) -> None:
    with pytest.raises(
        ConfigError, match="mpc-agg-topology: expected a path or id \\(a non-empty string\\), got 3"
    ):
        node_settings(context({"mpc-agg-topology": 3}))
    with pytest.raises(ConfigError, match=r"mpc-agg-tokens: expected .*, got ' '"):
        node_settings(context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": " "}))


def test_empty_strings_count_as_unset(secure: Path, insecure: Path) -> None:
    """An app declares the run-config keys in pyproject.toml (flwr run --run-config may
    override only declared keys); left empty, they fall through to the next source."""
    got = node_settings(context({"mpc-agg-topology": ""}, {"mpc-agg-topology": str(insecure)}))
    assert got.topology.name == "open"
    got = node_settings(context(None, {"mpc-agg-topology": ""}), insecure)
    assert got.topology.name == "open"
    run = {"mpc-agg-topology": "", "mpc-agg-collector-tokens": ""}
    strategy = MpcFedAvg.from_context(context(None, run), secure, collector_token="a,b,c")
    assert strategy.topology.name == "fed"


def test_unreadable_topology_names_the_key_and_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        node_settings(context({"mpc-agg-topology": str(missing)}))
    assert str(info.value).startswith("Flower node config: mpc-agg-topology:")
    assert str(missing) in str(info.value) and "cannot read topology" in str(info.value)
    # A run-config path is the SuperLink's: the message says to set the node's own.
    with pytest.raises(ConfigError, match="set mpc-agg-topology in this SuperNode's node config"):
        node_settings(context(None, {"mpc-agg-topology": str(missing)}))


def test_home_relative_paths_are_expanded(insecure: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(insecure.parent))
    got = node_settings(context({"mpc-agg-topology": f"~/{insecure.name}"}))
    assert got.topology.name == "open" and got.client_id == "flwr-node-7"


# --------------------------------------------------------------------------- client id, tokens


def test_client_id_comes_from_the_grants(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "hospital-a")
    got = node_settings(
        context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}, node_id=99)
    )
    assert got.client_id == "hospital-a"
    assert got.tokens == [token_of("hospital-a", i) for i in range(3)]
    assert got.client_id_source == "the grant files of mpc-agg-tokens"
    assert got.secret is None


def test_tokens_as_a_comma_separated_list_of_grant_files(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    files = sorted(grants.glob("*.token"), reverse=True)  # any order: sorted by index
    got = node_settings(
        context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": ", ".join(map(str, files))})
    )
    assert got.tokens == [token_of("alice", i) for i in range(3)]


def test_a_configured_id_equal_to_the_grants_is_accepted(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    node = {
        "mpc-agg-topology": str(secure),
        "mpc-agg-tokens": str(grants),
        "mpc-agg-client-id": "alice",
    }
    assert node_settings(context(node), client_id="alice").client_id == "alice"


@pytest.mark.parametrize("via", ["node config", "argument"])
def test_a_configured_id_other_than_the_grants_is_an_error(
    secure: Path, tmp_path: Path, via: str
) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    node = {"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}
    if via == "node config":
        node["mpc-agg-client-id"] = "bob"
        ctx, kwargs = context(node), {}
    else:
        ctx, kwargs = context(node), {"client_id": lambda c: "bob"}
    with pytest.raises(ConfigError) as info:
        node_settings(ctx, **kwargs)
    message = str(info.value)
    assert info.value.path == "mpc-agg-client-id"
    assert "'bob'" in message and "issued for 'alice'" in message


def test_grants_of_two_clients_are_an_error(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    (grants / "alice-2.token").unlink()
    TokenGrant("client", "bob", 2, ISSUER, token_of("bob", 2)).save(grants / "bob-2.token")
    with pytest.raises(ConfigError, match="issued for client 'bob', not 'alice'") as info:
        node_settings(context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}))
    assert str(info.value).startswith("Flower node config: mpc-agg-tokens:")


def test_missing_grant_is_an_error_naming_the_aggregator(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    (grants / "alice-1.token").unlink()
    with pytest.raises(ConfigError, match=r"from aggregator\(s\) 1"):
        node_settings(context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}))
    with pytest.raises(ConfigError, match="no \\*.token files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        node_settings(context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(empty)}))


def test_raw_tokens_need_a_configured_id(secure: Path) -> None:
    with pytest.raises(ConfigError, match="no client id for these tokens") as info:
        node_settings(context(), secure, token="a,b,c")
    assert info.value.path == "mpc-agg-client-id"
    got = node_settings(context({"mpc-agg-client-id": "carol"}), secure, token="a,b,c")
    assert (got.client_id, got.tokens) == ("carol", "a,b,c")
    assert got.client_id_source == "Flower node config mpc-agg-client-id"
    got = node_settings(context(node_id=5), secure, token=lambda c: ["x"] * 3, client_id="dave")
    assert (got.client_id, got.tokens) == ("dave", ["x"] * 3)


def test_secure_topology_without_tokens_is_an_error(secure: Path) -> None:
    with pytest.raises(ConfigError) as info:
        node_settings(context({"mpc-agg-client-id": "alice"}), secure)
    assert info.value.path == "mpc-agg-tokens"
    assert "requires one per aggregator" in str(info.value)
    assert "flower-supernode --node-config 'mpc-agg-tokens=" in str(info.value)


def test_node_id_is_the_client_id_only_on_an_insecure_topology(insecure: Path) -> None:
    got = node_settings(context(node_id=1234), insecure)
    assert got.client_id == "flwr-node-1234" and got.tokens is None
    assert node_settings(context({"mpc-agg-client-id": "eve"}), insecure).client_id == "eve"


def test_invalid_client_id_names_the_key(insecure: Path) -> None:
    with pytest.raises(ConfigError, match="client id 'a b' is invalid") as info:
        node_settings(context({"mpc-agg-client-id": "a b"}), insecure)
    assert info.value.path == "mpc-agg-client-id"


@pytest.mark.parametrize("key", ["mpc-agg-client-id", "mpc-agg-tokens", "mpc-agg-secret"])
def test_per_node_keys_are_refused_in_the_run_config(insecure: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="is per node") as info:
        node_settings(context(None, {key: "/x"}), insecure)
    assert str(info.value).startswith(f"Flower run config: {key}:")


def test_the_old_token_key_says_what_replaced_it(insecure: Path) -> None:
    with pytest.raises(ConfigError, match="renamed mpc-agg-tokens"):
        node_settings(context({"mpc-token": "a,b,c"}), insecure)


# --------------------------------------------------------------------------- secret


def test_secret_file_from_node_config_is_made_once_and_private(
    insecure: Path, tmp_path: Path
) -> None:
    path = tmp_path / "node" / "secret"
    path.parent.mkdir()
    first = node_settings(context({"mpc-agg-secret": str(path)}), insecure)
    assert first.secret is not None and len(first.secret) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = node_settings(context({"mpc-agg-secret": str(path)}), insecure, secret=b"x" * 16)
    assert again.secret == first.secret  # the node config wins over the argument
    assert node_settings(context(), insecure, secret=str(path)).secret == first.secret
    assert node_settings(context(), insecure, secret=b"y" * 16).secret == b"y" * 16
    # Neither the repr nor the settings' text shows the secret or the tokens.
    shown = repr(first)
    assert first.secret.hex() not in shown and "secret set" in shown


def test_repr_hides_tokens(secure: Path, tmp_path: Path) -> None:
    grants = write_grants(tmp_path / "g", "alice")
    got = node_settings(context({"mpc-agg-topology": str(secure), "mpc-agg-tokens": str(grants)}))
    assert isinstance(got, NodeSettings)
    assert all(t not in repr(got) for t in got.tokens)
    assert "'alice'" in repr(got) and "tokens set" in repr(got)


def test_unsafe_secret_file_names_the_key(insecure: Path, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("00" * 32)
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        node_settings(context({"mpc-agg-secret": str(path)}), insecure)
    assert str(info.value).startswith("Flower node config: mpc-agg-secret:")


# --------------------------------------------------------------------------- server


def test_server_takes_topology_and_collector_grants_from_the_run_config(
    secure: Path, insecure: Path, tmp_path: Path
) -> None:
    grants = write_grants(tmp_path / "c", None)
    run = {"mpc-agg-topology": str(secure), "mpc-agg-collector-tokens": str(grants)}
    strategy = MpcFedAvg.from_context(context(None, run), insecure, fraction_evaluate=0.25)
    assert strategy.topology.name == "fed"
    assert strategy.fraction_evaluate == 0.25
    assert strategy.collector._tokens == [token_of("collector", i) for i in range(3)]
    # Without the keys: the arguments.
    strategy = MpcFedAvg.from_context(context(), secure, collector_token="a,b,c")
    assert strategy.topology.name == "fed" and strategy.collector._tokens == ["a", "b", "c"]
    assert MpcFedAvg.from_context(context(), insecure).topology.name == "open"


def test_server_config_errors(secure: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[tool.flwr.app.config\]") as info:
        MpcFedAvg.from_context(context())
    assert info.value.path == "mpc-agg-topology"
    assert "this SuperNode" not in str(info.value)
    with pytest.raises(ConfigError, match="no collector tokens") as info:
        MpcFedAvg.from_context(context(None, {"mpc-agg-topology": str(secure)}))
    assert info.value.path == "mpc-agg-collector-tokens"
    # Client grants where the collector's are expected.
    clients = write_grants(tmp_path / "g", "alice")
    run = {"mpc-agg-topology": str(secure), "mpc-agg-collector-tokens": str(clients)}
    with pytest.raises(ConfigError, match="a client grant, where collector grants are needed"):
        MpcFedAvg.from_context(context(None, run))


# --------------------------------------------------------------------------- the mod


def test_mod_reads_nothing_until_a_train_message(tmp_path: Path) -> None:
    """``secure_train_mod()`` builds without any config; evaluate messages pass through
    without one; a train message on a node without a topology gets an error reply naming
    the key (in process, through Flower's ClientApp)."""
    app = ClientApp(mods=[secure_train_mod()])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise AssertionError("must not train without settings")

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"m": MetricRecord({"num-examples": 1})}), reply_to=msg)

    replies: dict[str, list[Message]] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        arrays = ArrayRecord({"w": Array(np.zeros(2))})
        for kind in ("evaluate", "train"):
            messages = [
                Message(RecordDict({"arrays": arrays}), node, kind) for node in grid.get_node_ids()
            ]
            replies[kind] = list(grid.send_and_receive(messages))

    run_server_app(server, InProcessGrid(app, 2))
    assert all(not m.has_error() for m in replies["evaluate"])
    assert all(m.has_error() for m in replies["train"])
    assert all("mpc-agg-topology: no topology" in m.error.reason for m in replies["train"])
