"""``mpc-agg keygen``, ``assemble``, ``token`` and ``verify --card`` (in process), and the
token grants and assembly they are built on (mpc_agg.credentials, mpc_agg.assembly)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from mpc_agg.assembly import assemble, card_differences
from mpc_agg.cli import main
from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.schema import Topology
from mpc_agg.credentials import (
    TokenGrant,
    issue_client_grant,
    issue_collector_grant,
    read_grant,
    read_grants,
    tokens_for,
)
from mpc_agg.errors import ConfigError
from mpc_agg.identity import collector_token, load_party_dir, read_card, token_key
from mpc_agg.transport.auth import client_token

TEMPLATE = {
    "name": "three-orgs",
    "threshold": 1,
    "rounds": {"min_clients": 2, "max_clients": 1000, "max_dim": 100000},
    "encoding": {"frac_bits": 16, "coord_clip": 100.0},
}


def _keygen(tmp: Path, index: int, host: str = "127.0.0.1", *extra: str) -> Path:
    party = tmp / f"org{index}"
    code = main(
        [
            "keygen",
            "--party-dir",
            str(party),
            "--index",
            str(index),
            "--host",
            host,
            "--mpc-port",
            str(12000 + index),
            "--http-port",
            str(12100 + index),
            *extra,
        ]
    )
    assert code == 0
    return party


@pytest.fixture(scope="module")
def orgs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """Three parties' directories made by keygen, the template, and the assembled topology."""
    tmp = tmp_path_factory.mktemp("orgs")
    parties = [_keygen(tmp, i) for i in range(3)]
    template = tmp / "template.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    topology = tmp / "topology.yaml"
    cards = [str(parties[i] / "card.yaml") for i in (2, 0, 1)]  # any order
    assert main(["assemble", "--template", str(template), *cards, "-o", str(topology)]) == 0
    return template, parties, topology


def test_keygen_writes_private_files_0600_and_local_settings(
    orgs: tuple[Path, list[Path], Path],
) -> None:
    _, parties, _ = orgs
    for party in parties:
        for name in ("party-link.key", "https.key", "signing.key", "token.key", "collector.token"):
            assert stat.S_IMODE(os.stat(party / name).st_mode) == 0o600, name
        assert yaml.safe_load((party / "party.yaml").read_text()) == {"data_dir": "data"}


def test_keygen_never_overwrites(orgs: tuple[Path, list[Path], Path], capsys) -> None:
    _, parties, _ = orgs
    before = (parties[0] / "signing.key").read_bytes()
    code = main(
        [
            "keygen",
            "--party-dir",
            str(parties[0]),
            "--index",
            "0",
            "--host",
            "127.0.0.1",
            "--mpc-port",
            "12000",
            "--http-port",
            "12100",
        ]
    )
    assert code == 2
    assert "never overwritten" in capsys.readouterr().err
    assert (parties[0] / "signing.key").read_bytes() == before


def test_keygen_refuses_a_bad_address_before_making_keys(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "keygen",
            "--party-dir",
            str(tmp_path / "p"),
            "--index",
            "0",
            "--host",
            "127.0.0.1",
            "--mpc-port",
            "70000",
            "--http-port",
            "8000",
        ]
    )
    assert code == 2
    assert "mpc_port" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_keygen_writes_bind_into_party_settings(tmp_path: Path) -> None:
    party = _keygen(tmp_path, 0, "agg0.example.org", "--bind", "0.0.0.0", "--data-dir", "/srv/d")
    assert yaml.safe_load((party / "party.yaml").read_text()) == {
        "data_dir": "/srv/d",
        "bind": "0.0.0.0",
    }
    assert read_card(party).host == "agg0.example.org"


def test_assembled_topology_holds_every_card_and_each_party_loads_its_own(
    orgs: tuple[Path, list[Path], Path], capsys
) -> None:
    _, parties, path = orgs
    topology = Topology.load(path)
    assert topology.has_keys and topology.m == 3
    for i, party in enumerate(parties):
        assert card_differences(topology, read_card(party)) == []
        load_party_dir(party, topology.aggregators[i])  # raises on any mismatch
        assert main(["verify", "-t", str(path), "--party-dir", str(party)]) == 0
    out = capsys.readouterr().out
    assert fingerprint(topology) in out
    assert fingerprint(topology) in path.read_text()  # the header names it


def test_assembling_twice_gives_the_same_bytes(orgs: tuple[Path, list[Path], Path]) -> None:
    template, parties, path = orgs
    again = assemble(template, [read_card(p) for p in reversed(parties)])
    assert again.text == path.read_text()


def test_verify_card_names_what_was_changed(
    orgs: tuple[Path, list[Path], Path], tmp_path: Path, capsys
) -> None:
    _, parties, path = orgs
    doc = yaml.safe_load(path.read_text())
    doc["aggregators"][1]["http_port"] = 9999
    doc["aggregators"][1]["signing_key"] = doc["aggregators"][2]["signing_key"]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(doc))
    assert main(["verify", "-t", str(changed), "--party-dir", str(parties[1])]) == 1
    err = capsys.readouterr().err
    assert "http_port" in err and "signing_key" in err
    assert main(["verify", "-t", str(changed), "--party-dir", str(parties[0])]) == 0
    # The party itself refuses to start on it.
    with pytest.raises(ConfigError, match="signing"):
        load_party_dir(parties[1], Topology.load(changed).aggregators[1])


def test_a_changed_address_is_refused_at_party_start(
    orgs: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    _, parties, path = orgs
    doc = yaml.safe_load(path.read_text())
    doc["aggregators"][0]["mpc_port"] = 13999
    changed = tmp_path / "moved.yaml"
    changed.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="differs from this party's own card.*mpc_port"):
        load_party_dir(parties[0], Topology.load(changed).aggregators[0])


@pytest.mark.parametrize(
    ("cards", "message"),
    [
        ((0, 1), "2t < m"),  # the assembled topology is validated
        ((0, 0, 1), "two cards for aggregator 0"),
        ((0, 2), "missing 1"),
    ],
)
def test_assemble_checks_the_card_numbering(
    orgs: tuple[Path, list[Path], Path], cards: tuple[int, ...], message: str | None
) -> None:
    template, parties, _ = orgs
    chosen = [read_card(parties[i]) for i in cards]
    if message is None:
        assert assemble(template, chosen).topology.m == 2
    else:
        with pytest.raises(ConfigError, match=message):
            assemble(template, chosen)


def test_assemble_checks_planned_addresses(
    orgs: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    _, parties, _ = orgs
    planned = dict(TEMPLATE)
    planned["aggregators"] = [
        {"host": "127.0.0.1", "mpc_port": 12000 + i, "http_port": 12100 + i} for i in range(3)
    ]
    good = tmp_path / "planned.yaml"
    good.write_text(yaml.safe_dump(planned))
    assert assemble(good, [read_card(p) for p in parties]).topology.m == 3
    planned["aggregators"][2]["http_port"] = 1
    bad = tmp_path / "planned-bad.yaml"
    bad.write_text(yaml.safe_dump(planned))
    with pytest.raises(ConfigError, match=r"aggregators\[2\].http_port.*card says 12102"):
        assemble(bad, [read_card(p) for p in parties])
    planned["aggregators"][2] = {"host": "127.0.0.1", "signing_key": "ab" * 32}
    keyed = tmp_path / "planned-keyed.yaml"
    keyed.write_text(yaml.safe_dump(planned))
    with pytest.raises(ConfigError, match="keys come from the party's card"):
        assemble(keyed, [read_card(p) for p in parties])


def test_assemble_refuses_to_overwrite(orgs: tuple[Path, list[Path], Path], capsys) -> None:
    template, parties, path = orgs
    code = main(["assemble", "--template", str(template), str(parties[0]), "-o", str(path)])
    assert code == 2
    assert "already exists" in capsys.readouterr().err


def test_token_grants_from_each_aggregator_make_the_client_tokens(
    orgs: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    _, parties, path = orgs
    topology = Topology.load(path)
    for party in parties:
        assert (
            main(
                [
                    "token",
                    "--party-dir",
                    str(party),
                    "--client",
                    "alice",
                    "bob",
                    "-o",
                    str(tmp_path),
                ]
            )
            == 0
        )
    for name in ("alice-0.token", "bob-2.token"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    grants = read_grants(sorted(tmp_path.glob("alice-*.token")))
    assert tokens_for(topology, grants, "client") == [
        client_token(token_key(p), "alice") for p in parties
    ]
    # Issuing again gives the same token; an existing file needs --force.
    assert issue_client_grant(parties[1], "alice") == read_grant(tmp_path / "alice-1.token")
    assert (
        main(["token", "--party-dir", str(parties[0]), "--client", "alice", "-o", str(tmp_path)])
        == 2
    )
    assert (
        main(
            [
                "token",
                "--party-dir",
                str(parties[0]),
                "--client",
                "alice",
                "-o",
                str(tmp_path),
                "--force",
            ]
        )
        == 0
    )


def test_collector_grants(orgs: tuple[Path, list[Path], Path], tmp_path: Path, capsys) -> None:
    _, parties, path = orgs
    topology = Topology.load(path)
    assert main(["token", "--party-dir", str(parties[2]), "--collector", "-o", "-"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["token"] == collector_token(parties[2])
    grants = [(Path(f"c{i}"), issue_collector_grant(p)) for i, p in enumerate(parties)]
    assert tokens_for(topology, grants, "collector") == [collector_token(p) for p in parties]
    with pytest.raises(ConfigError, match="a collector grant, where client grants are needed"):
        tokens_for(topology, grants, "client")


def test_clients_file(orgs: tuple[Path, list[Path], Path], tmp_path: Path) -> None:
    _, parties, _ = orgs
    ids = tmp_path / "ids.txt"
    ids.write_text("# enrolled\nc1\n\nc2\n")
    out = tmp_path / "out"
    assert (
        main(["token", "--party-dir", str(parties[0]), "--clients-file", str(ids), "-o", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["c1-0.token", "c2-0.token"]


def test_tokens_for_names_what_is_wrong(
    orgs: tuple[Path, list[Path], Path], tmp_path: Path
) -> None:
    _, parties, path = orgs
    topology = Topology.load(path)
    alice = [(Path(f"a{i}"), issue_client_grant(p, "alice")) for i, p in enumerate(parties)]
    with pytest.raises(ConfigError, match=r"from aggregator\(s\) 1"):
        tokens_for(topology, [alice[0], alice[2]], "client")
    with pytest.raises(ConfigError, match="also has a grant"):
        tokens_for(topology, [*alice, alice[0]], "client")
    bob = (Path("b1"), issue_client_grant(parties[1], "bob"))
    with pytest.raises(ConfigError, match="issued for client 'bob', not 'alice'"):
        tokens_for(topology, [alice[0], bob, alice[2]], "client")
    with pytest.raises(ConfigError, match="issued for client 'alice', not 'carol'"):
        tokens_for(topology, alice, "client", "carol")
    # A grant of another deployment's aggregator 1 (another signing key).
    other = _keygen(tmp_path, 1)
    foreign = (Path("foreign"), issue_client_grant(other, "alice"))
    with pytest.raises(ConfigError, match="another deployment"):
        tokens_for(topology, [alice[0], foreign, alice[2]], "client")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("format: other\n", "not a token grant"),
        ("- a\n", "not a token grant"),
        (": :\n", "not valid YAML"),
        (
            "format: mpc_agg/token-grant/v1\nrole: client\nclient: a\naggregator: 0\n"
            "issuer: zz\ntoken: " + "a" * 64 + "\n",
            "issuer",
        ),
        (
            "format: mpc_agg/token-grant/v1\nrole: admin\naggregator: 0\n",
            "role",
        ),
        (
            "format: mpc_agg/token-grant/v1\nrole: client\nclient: a\naggregator: -1\n",
            "aggregator",
        ),
        (
            "format: mpc_agg/token-grant/v1\nrole: collector\nclient: a\naggregator: 0\n",
            "names no client",
        ),
        ("format: mpc_agg/token-grant/v1\nextra: 1\n", "unknown key"),
    ],
)
def test_malformed_grants_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.token"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        read_grant(path)
    assert str(path) in str(info.value)


def test_grant_repr_hides_the_token() -> None:
    grant = TokenGrant("client", "alice", 0, "ab" * 32, "cd" * 32)
    assert "cd" * 32 not in repr(grant) and "alice" in repr(grant)
    with pytest.raises(Exception, match="names its client id"):
        TokenGrant("client", None, 0, "ab" * 32, "cd" * 32)


def test_an_empty_grant_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no \\*.token files"):
        read_grants([tmp_path])
