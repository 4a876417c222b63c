"""Throw-away keys for a topology run on one machine (development, tests, the demo).

README, "Running aggregators" and "Security model". A shipped topology such as
``configs/local-3.yaml`` is a *template*: addresses and settings, no keys. Before the local
launcher starts its parties, :func:`provision_local` gives every aggregator a party
directory of its own (:mod:`mpc_agg.identity`) and writes the *provisioned* topology, the
template plus each party's public card, next to them::

    <data_dir>/local-keys/
      topology.yaml        the template with every aggregator's public keys; data_dir absolute
      party-0/ ... party-{m-1}/   each party's private keys and tokens (mode 0600)

Keys are made once and kept, so relaunching the same template gives the same topology
fingerprint and the same tokens (a changed setting keeps the keys; a changed address is
refused: delete the directory to start afresh). Since one person holds every party's keys
here, this is for one machine only; organisations make their own keys (README, "Deploying").

A local script reaches the federation through :class:`LocalDeployment`::

    deployment = LocalDeployment.open(".mpc_agg-data/local-3/local-keys")
    deployment.collector().open_round("r1", dim=10)
    deployment.client("alice").submit("r1", vector)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mpc_agg.config.load import read_document
from mpc_agg.config.schema import Topology
from mpc_agg.errors import ConfigError
from mpc_agg.identity import CARD, collector_token, generate_party_dir, token_key
from mpc_agg.transport.auth import client_token

if TYPE_CHECKING:
    from mpc_agg.client import Client
    from mpc_agg.collector import Collector

LOCAL_KEYS = "local-keys"
TOPOLOGY_FILE = "topology.yaml"


@dataclass(frozen=True)
class LocalDeployment:
    """A topology file and every party's directory, all on this machine."""

    topology_path: Path
    party_dirs: tuple[Path, ...]

    @classmethod
    def open(cls, directory: str | Path) -> LocalDeployment:
        """The deployment :func:`provision_local` wrote into ``directory``."""
        directory = Path(directory).resolve()
        path = directory / TOPOLOGY_FILE
        topology = Topology.load(path)
        return cls(path, tuple(directory / f"party-{i}" for i in range(topology.m)))

    def topology(self) -> Topology:
        """The provisioned topology (with every aggregator's public keys; read once)."""
        return self._topology

    @functools.cached_property
    def _topology(self) -> Topology:
        return Topology.load(self.topology_path)

    @functools.cached_property
    def _token_keys(self) -> list[bytes]:
        return [token_key(d) for d in self.party_dirs]

    def collector_tokens(self) -> list[str]:
        """The collector's token at each aggregator, in index order."""
        return [collector_token(d) for d in self.party_dirs]

    def client_tokens(self, client_id: str) -> list[str]:
        """Client ``client_id``'s token at each aggregator, in index order."""
        return [client_token(key, client_id) for key in self._token_keys]

    def collector(self, **kwargs: Any) -> Collector:
        """A :class:`~mpc_agg.collector.Collector` with this deployment's tokens."""
        from mpc_agg.collector import Collector

        topology = self.topology()
        tokens = None if topology.insecure else self.collector_tokens()
        return Collector(topology, tokens, **kwargs)

    def client(self, client_id: str, **kwargs: Any) -> Client:
        """A :class:`~mpc_agg.client.Client` named ``client_id`` with its tokens."""
        from mpc_agg.client import Client

        topology = self.topology()
        tokens = None if topology.insecure else self.client_tokens(client_id)
        return Client(topology, client_id, tokens, **kwargs)


def provision_local(
    template: str | Path,
    *,
    directory: str | Path | None = None,
    data_dir: str | Path | None = None,
    cwd: str | Path | None = None,
) -> LocalDeployment:
    """Give every aggregator of the template ``template`` a party directory and write the
    provisioned topology; returns the deployment. A relative ``data_dir`` in the template
    resolves against the template's directory (as :meth:`Topology.load` does), or against
    ``cwd`` if one is given; ``data_dir`` replaces it (relative: to the current directory).
    ``directory`` defaults to ``<data_dir>/local-keys``. Keys already there are reused."""
    source = str(Path(template))
    doc = read_document(template)
    base = Path(cwd) if cwd is not None else Path(template).parent
    topology = Topology.from_dict(doc, source=source, relative_to=base)
    if topology.has_keys:
        raise ConfigError(
            "aggregators",
            "this topology already names every aggregator's keys; start each party with its "
            "own party directory (--party-dir) instead of provisioning new keys",
            source,
        )
    data_dir = Path(data_dir).resolve() if data_dir is not None else topology.data_dir
    out = Path(directory).resolve() if directory is not None else data_dir / LOCAL_KEYS
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    assert isinstance(doc, dict)  # Topology.from_dict accepted it
    provisioned = copy.deepcopy(doc)
    provisioned["data_dir"] = str(data_dir)
    entries = []
    for a in topology.aggregators:
        party_dir = out / f"party-{a.index}"
        card_file = party_dir / CARD
        if card_file.exists():
            entry = yaml.safe_load(card_file.read_text())["card"]
            if (entry["host"], entry["mpc_port"], entry["http_port"]) != (
                a.host,
                a.mpc_port,
                a.http_port,
            ):
                raise ConfigError(
                    f"aggregators[{a.index}]",
                    f"the keys in {str(party_dir)!r} were made for {entry['host']}:"
                    f"{entry['mpc_port']}/{entry['http_port']}, not {a.host}:{a.mpc_port}/"
                    f"{a.http_port}; delete {str(out)!r} to provision afresh",
                    source,
                )
        else:
            entry = generate_party_dir(party_dir, a.index, a.host, a.mpc_port, a.http_port).entry()
        entries.append(entry)
    provisioned["aggregators"] = entries
    path = out / TOPOLOGY_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        "# Provisioned by mpc_agg.provision from "
        f"{source}: throw-away keys for this machine only.\n"
        + yaml.safe_dump(provisioned, sort_keys=False)
    )
    tmp.replace(path)
    Topology.load(path)  # it must load as it will for the parties
    return LocalDeployment(path, tuple(out / f"party-{i}" for i in range(topology.m)))


def deployment_of(topology_path: str | Path, party_dirs: Sequence[str | Path]) -> LocalDeployment:
    """A deployment from an assembled topology and this machine's party directories."""
    return LocalDeployment(Path(topology_path).resolve(), tuple(Path(d) for d in party_dirs))
