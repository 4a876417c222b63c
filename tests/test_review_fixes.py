"""Fixes of the security review of the cross-organisation deployment (/tmp/review14.md):
files holding secrets are never written through a planted link, keygen refuses a party
directory others can change, bad input is a typed error (exit 2) rather than a traceback,
and a bind address cannot expose an insecure topology beyond loopback."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import pytest
import yaml

from mpc_agg.cli import main
from mpc_agg.config.party_settings import check_bind, command_line_settings, read_party_settings
from mpc_agg.config.schema import Topology
from mpc_agg.credentials import TokenGrant, read_grant
from mpc_agg.errors import ConfigError, UsageError
from mpc_agg.identity import read_card
from mpc_agg.storage.binding import MARKER, Marker, write_marker

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX modes and links")

GRANT = TokenGrant(role="client", client="alice", aggregator=0, issuer="a" * 64, token="b" * 64)


def _keygen(party: Path, *extra: str) -> int:
    return main(
        [
            "keygen",
            "--party-dir",
            str(party),
            "--index",
            "0",
            "--host",
            "127.0.0.1",
            "--mpc-port",
            "12000",
            "--http-port",
            "12100",
            *extra,
        ]
    )


# --------------------------------------------------------------------------- grant files


@posix_only
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_grant_is_never_written_through_a_planted_link(tmp_path, overwrite):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    victim.chmod(0o666)
    target = tmp_path / GRANT.default_name
    target.symlink_to(victim)
    if overwrite:
        GRANT.save(target, overwrite=True)
        assert not target.is_symlink()  # the link itself is replaced, not followed
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        assert read_grant(target).token == "b" * 64
    else:
        with pytest.raises(UsageError, match="already exists"):
            GRANT.save(target)
    assert victim.read_text() == "untouched\n"


@posix_only
def test_overwriting_a_readable_grant_leaves_a_private_file(tmp_path):
    target = tmp_path / GRANT.default_name
    target.write_text("old\n")
    target.chmod(0o644)
    GRANT.save(target, overwrite=True)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left


@pytest.mark.parametrize("client", ["", "a\nb", "../x", "a/b"])
def test_a_grant_with_an_invalid_client_id_is_refused_by_key(tmp_path, client):
    doc = {
        "format": "mpc_agg/token-grant/v1",
        "role": "client",
        "client": client,
        "aggregator": 0,
        "issuer": "a" * 64,
        "token": "b" * 64,
    }
    path = tmp_path / "g.token"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="client"):
        read_grant(path)


# --------------------------------------------------------------------------- keygen


@posix_only
def test_keygen_refuses_a_party_directory_others_can_write(tmp_path, capsys):
    party = tmp_path / "shared"
    party.mkdir()
    party.chmod(0o777)
    assert _keygen(party) == 2
    assert "writable by group or others" in capsys.readouterr().err
    assert list(party.iterdir()) == []


@posix_only
def test_keygen_never_writes_a_public_file_through_a_planted_link(tmp_path, capsys):
    party = tmp_path / "p"
    party.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    (party / "https.crt").symlink_to(victim)
    assert _keygen(party) == 2
    assert "https.crt" in capsys.readouterr().err
    assert victim.read_text() == "untouched\n"
    assert not (party / "token.key").exists()  # refused before any key was made


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--bind", "bad host"], "--bind"),
        (["--bind", "[::1]"], "--bind"),
        (["--data-dir", ""], "--data-dir"),
    ],
)
def test_keygen_checks_party_yaml_settings_before_making_keys(tmp_path, capsys, extra, words):
    party = tmp_path / "p"
    assert _keygen(party, *extra) == 2
    assert words in capsys.readouterr().err
    assert not party.exists()


def test_keygen_writes_a_normalised_bind_address(tmp_path):
    party = tmp_path / "p"
    assert _keygen(party, "--bind", "0:0::0") == 0
    assert read_party_settings(party).bind == "::"


# --------------------------------------------------------------------------- typed errors


def test_a_card_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_bytes(b"\xff\xfe card")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_card(path)


def test_a_huge_card_is_refused(tmp_path):
    path = tmp_path / "card.yaml"
    path.write_bytes(b"#" * (1 << 17))
    with pytest.raises(ConfigError, match="too large"):
        read_card(path)


def test_cli_inputs_that_are_not_utf8_exit_2_without_a_traceback(tmp_path, capsys):
    party = tmp_path / "p"
    assert _keygen(party) == 0
    ids = tmp_path / "ids"
    ids.write_bytes(b"\xff\n")
    assert main(["token", "--party-dir", str(party), "--clients-file", str(ids)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff")
    card = str(party / "card.yaml")
    assert main(["assemble", "--template", str(bad), card, "-o", str(tmp_path / "t.yaml")]) == 2
    assert main(["assemble", "--template", str(bad), str(bad), "-o", str(tmp_path / "t.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UTF-8" in err


def test_a_data_dir_with_a_nul_byte_is_a_config_error(tmp_path):
    (tmp_path / "party.yaml").write_text('data_dir: "a\\0b"\n')
    with pytest.raises(ConfigError, match="data_dir"):
        read_party_settings(tmp_path)
    with pytest.raises(ConfigError, match="--data-dir"):
        command_line_settings("a\0b", None)


# --------------------------------------------------------------------------- bind address

INSECURE = {
    "name": "loop",
    "threshold": 1,
    "insecure": True,
    "aggregators": [
        {"host": "127.0.0.1", "mpc_port": 11365 + i, "http_port": 8701 + i} for i in range(3)
    ],
    "rounds": {"min_clients": 2, "max_clients": 100, "max_dim": 1000},
    "encoding": {"frac_bits": 16, "coord_clip": 100.0},
}


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "10.0.0.1", "example.org", "0"])
def test_an_insecure_topology_may_not_bind_beyond_loopback(bind):
    with pytest.raises(ConfigError, match="loopback"):
        check_bind(Topology.from_dict(copy.deepcopy(INSECURE)), bind)


@pytest.mark.parametrize("bind", [None, "127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_an_insecure_topology_may_bind_loopback(bind):
    check_bind(Topology.from_dict(copy.deepcopy(INSECURE)), bind)


# --------------------------------------------------------------------------- data dir marker


@posix_only
def test_the_marker_is_never_written_through_a_stale_temporary_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / (MARKER + ".tmp")).symlink_to(victim)
    marker = Marker("t", 0, "0" * 64, {"security": "x"}, "now")
    write_marker(data, marker)
    assert victim.read_text() == "untouched\n"
    assert Marker.from_json((data / MARKER).read_bytes()) == marker


# --------------------------------------------------------------------------- systemd unit


def test_the_systemd_unit_drops_the_first_start_flag_once_started():
    unit = Path(__file__).parent.parent / "deploy" / "mpc-agg-party@.service"
    lines = unit.read_text().splitlines()
    assert "EnvironmentFile=-/etc/mpc-agg/%i.env" in lines
    assert "ExecStartPost=+/bin/rm -f /etc/mpc-agg/%i.env" in lines


def test_a_binary_topology_file_is_a_named_config_error(tmp_path) -> None:
    from mpc_agg.config.schema import Topology
    from mpc_agg.errors import ConfigError

    path = tmp_path / "topology.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        Topology.load(path)
    assert str(path) in str(info.value)
