"""Where a party keeps its state and where it listens: paths relative to the file that
names them, party.yaml and the command line (mpc_agg/config/party_settings.py), IPv6 hosts
(schema, fingerprint, URLs, MPyC options)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.config.party_settings import (
    PartySettings,
    command_line_settings,
    read_party_settings,
)
from mpc_agg.config.schema import AggregatorAddress, Topology, host_port
from mpc_agg.errors import ConfigError
from mpc_agg.mpc.argv import mpyc_argv
from mpc_agg.provision import provision_local

DOC = {
    "name": "pinned",
    "threshold": 1,
    "aggregators": [
        {"host": "127.0.0.1", "mpc_port": 11365, "http_port": 8701},
        {"host": "Agg1.Example.org", "mpc_port": 11366, "http_port": 8702},
        {"host": "10.0.0.3", "mpc_port": 11367, "http_port": 8703},
    ],
    "rounds": {"min_clients": 2, "max_clients": 100, "max_dim": 1000},
    "encoding": {"frac_bits": 16, "coord_clip": 100.0},
    "data_dir": "d",
}


def doc(**change: object) -> dict:
    out = copy.deepcopy(DOC)
    out.update(change)
    return out


def v6_doc() -> dict:
    d = doc()
    d["aggregators"] = [
        {"host": "::1", "mpc_port": 11365, "http_port": 8701},
        {"host": "0:0::1", "mpc_port": 11366, "http_port": 8702},
        {"host": "FD00::2", "mpc_port": 11367, "http_port": 8703},
    ]
    return d


# --------------------------------------------------------------------------- paths


def test_a_relative_data_dir_resolves_against_the_topology_files_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "t.yaml"
    path.write_text(yaml.safe_dump(doc(data_dir="../state/t")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (path, Path("../conf/t.yaml")):
        topology = Topology.load(given)
        assert topology.data_dir == tmp_path / "state" / "t"
        assert topology.aggregator_dir(1) == tmp_path / "state" / "t" / "aggregator-1"
    without = doc()
    del without["data_dir"]
    path.write_text(yaml.safe_dump(without))  # the default is relative to the file too
    assert Topology.load(path).data_dir == tmp_path / "conf" / ".mpc_agg-data" / "pinned"
    path.write_text(yaml.safe_dump(doc(data_dir="/abs/t")))
    assert Topology.load(path).data_dir == Path("/abs/t")


def test_from_dict_without_a_file_keeps_a_relative_data_dir(tmp_path):
    assert Topology.from_dict(doc()).data_dir == Path("d")
    assert Topology.from_dict(doc(), relative_to=tmp_path).data_dir == tmp_path / "d"


def test_provisioning_resolves_against_the_template_or_the_given_data_dir(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    template = tmp_path / "conf" / "t.yaml"
    template.write_text(yaml.safe_dump(doc(data_dir="../state")))
    monkeypatch.chdir(tmp_path / "conf")
    deployment = provision_local(template)
    assert deployment.topology().data_dir == tmp_path / "state"
    assert deployment.topology_path == tmp_path / "state" / "local-keys" / "topology.yaml"
    other = provision_local(template, data_dir=tmp_path / "scratch")
    assert other.topology().data_dir == tmp_path / "scratch"


def test_shipped_configs_keep_their_data_in_the_repositorys_mpc_agg_data():
    root = Path(__file__).resolve().parent.parent
    assert ".mpc_agg-data/" in (root / ".gitignore").read_text().split()
    for path in sorted((root / "configs").glob("*.yaml")):
        topology = Topology.load(path)
        assert topology.data_dir == root / ".mpc_agg-data" / topology.name, path


# --------------------------------------------------------------------------- party.yaml


def test_party_yaml_paths_are_relative_to_the_party_directory(tmp_path):
    party = tmp_path / "party-1"
    party.mkdir()
    assert read_party_settings(party) == PartySettings()
    (party / "party.yaml").write_text("data_dir: ../state\nbind: 0.0.0.0\n")
    assert read_party_settings(party) == PartySettings(tmp_path / "state", "0.0.0.0")
    (party / "party.yaml").write_text("# only a comment\n")
    assert read_party_settings(party) == PartySettings()
    (party / "party.yaml").write_text("bind: '::'\n")
    assert read_party_settings(party) == PartySettings(None, "::")
    (party / "party.yaml").write_text("stream_above_mb: 2\n")
    assert read_party_settings(party) == PartySettings(stream_above_mb=2.0)
    cli = command_line_settings(None, None)
    assert cli.over(read_party_settings(party)).stream_above_mb == 2.0


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("port: 1\n", "port", "unknown key 'port'"),
        ("bind: 1\n", "bind", "expected str"),
        ("stream_above_mb: yes\n", "stream_above_mb", "number of MiB"),
        ("stream_above_mb: '4'\n", "stream_above_mb", "number of MiB"),
        ("bind: '[::1]'\n", "bind", "without brackets"),
        ("bind: 'a b'\n", "bind", "not a host"),
        ("- data_dir\n", "<root>", "mapping"),
        ("data_dir: [x\n", "<yaml>", "not valid YAML"),
    ],
)
def test_a_bad_party_yaml_is_refused_naming_the_file_and_key(tmp_path, text, path, words):
    (tmp_path / "party.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        read_party_settings(tmp_path)
    assert info.value.path == path and words in info.value.detail
    assert info.value.source == str(tmp_path / "party.yaml")


def test_the_command_line_wins_over_party_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = command_line_settings("here", None)
    assert flags == PartySettings(tmp_path / "here", None)
    merged = flags.over(PartySettings(tmp_path / "there", "0.0.0.0"))
    assert merged == PartySettings(tmp_path / "here", "0.0.0.0")
    assert command_line_settings(None, "::").over(PartySettings()) == PartySettings(None, "::")
    with pytest.raises(ConfigError, match="--bind"):
        command_line_settings(None, "no/such")


# --------------------------------------------------------------------------- IPv6


def test_ipv6_hosts_load_normalised_with_bracketed_urls():
    topology = Topology.from_dict(v6_doc())
    hosts = [a.host for a in topology.aggregators]
    assert hosts == ["::1", "::1", "fd00::2"]
    assert topology.aggregators[0].url == "https://[::1]:8701"
    assert topology.aggregators[2].url == "https://[fd00::2]:8703"
    assert host_port("::1", 5) == "[::1]:5" and host_port("10.0.0.1", 5) == "10.0.0.1:5"
    insecure = Topology.from_dict(
        {**v6_doc(), "aggregators": v6_doc()["aggregators"][:2]}
        | {"insecure": True, "threshold": 0}
    )
    assert insecure.aggregators[1].url == "http://[::1]:8702"  # ::1 is loopback


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("[::1]", "without brackets"),
        ("fe80::1%eth0", "not a host name"),
        ("1:2:3", "not a host name"),
        ("a:b", "not a host name"),
        ("user@host", "not a host name"),
        ("", "not a host name"),
    ],
)
def test_malformed_hosts_are_refused(host, words):
    with pytest.raises(ConfigError) as info:
        AggregatorAddress(index=0, host=host, mpc_port=1, http_port=2)
    assert info.value.path == "aggregators[0].host" and words in info.value.detail


def test_the_fingerprint_normalises_ipv6_and_keeps_ipv4_and_dns_fingerprints():
    # Pinned with the code before IPv6 support: existing topologies keep their fingerprint.
    pinned = "973e333987bfd065f63f53b22a046df6b4d2a7a7d166d73cb15d5e87863b4839"
    assert fingerprint(Topology.from_dict(doc())) == pinned
    spelled = v6_doc()
    spelled["aggregators"][0]["host"] = "0000:0000::0001"
    spelled["aggregators"][2]["host"] = "fd00:0::2"
    assert fingerprint(Topology.from_dict(spelled)) == fingerprint(Topology.from_dict(v6_doc()))


def test_mpyc_options_carry_ipv6_hosts_as_mpyc_parses_them():
    topology = Topology.from_dict(v6_doc())
    argv = mpyc_argv(topology, 1)
    values = [argv[i + 1] for i, a in enumerate(argv) if a == "-P"]
    assert values == ["::1:11365", "::1:11366", "fd00::2:11367"]
    for value, a in zip(values, topology.aggregators, strict=True):
        host, port = value.rsplit(":", maxsplit=1)  # mpyc.runtime's parsing of -P (0.11)
        assert (host, int(port)) == (a.host, a.mpc_port)
