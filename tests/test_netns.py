"""Three organisations on a real (emulated) wide-area network, and their keys kept apart.

README, "Deploying across organisations". The ``netns`` test builds the lab of
``scripts/netns_lab.py``: each aggregator in its own network namespace with its own address
(10.77.0.10-12), the clients and the collector in a fourth (10.77.0.13), 25 ms one way on
every path (50 ms round trips) and 100 Mbit/s per host. Each party's directory is made by
``mpc-agg keygen`` in its own directory; the topology is assembled from the cards and
checked with ``verify --card``; each party is started with ``ip netns exec`` as ``mpc-agg
party --topology --party-dir`` from its own directory; then a full round with TLS, tokens
and discrete Gaussian noise runs through the CLI from the clients' namespace: ``open``,
four ``submit``, ``collect``, ``verify``. Skipped, with the reason, where the lab cannot be
built (not root, no iproute2, namespaces refused).

The other test needs no network: it proves that no file in one party's directory holds
another party's private key or secret, comparing the bytes (text, raw, hex) of every
private file and the public key of every private key file across the directories.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from mpc_agg.cli import main as mpc_agg_main
from mpc_agg.identity import PRIVATE_FILES, read_card
from scripts import netns_lab
from tests.party_dirs import foreign_secrets, public_key_of

ROOT = Path(__file__).resolve().parent.parent
DP_TEMPLATE = ROOT / "configs" / "dp-gaussian-3.yaml"
CLIENTS = ("alice", "bob", "carol", "dave")


# -- no party directory holds another party's secrets ----------------------------------------


def _keygen_three(root: Path) -> list[Path]:
    dirs = []
    for i in range(3):
        d = root / f"org-{i}" / "party"
        status = mpc_agg_main(
            ["keygen", "--party-dir", str(d), "--index", str(i), "--host", f"10.77.0.{10 + i}",
             "--mpc-port", "11400", "--http-port", "8800"]
        )  # fmt: skip
        assert status == 0
        dirs.append(d)
    return dirs


def test_party_directories_hold_only_their_own_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs = _keygen_three(tmp_path)
    cards = [str(d / "card.yaml") for d in dirs]
    template = tmp_path / "template.yaml"
    template.write_text(
        "name: isolation\nthreshold: 1\nrounds: {min_clients: 2, max_clients: 100, "
        "max_dim: 1000}\nencoding: {frac_bits: 16, coord_clip: 10.0}\n"
    )
    topology = tmp_path / "topology.yaml"
    assert mpc_agg_main(["assemble", "--template", str(template), *cards, "-o", str(topology)]) == 0
    for d in dirs:  # what each party does with the shared topology and its own directory
        (d / "topology.yaml").write_bytes(topology.read_bytes())
        assert mpc_agg_main(["verify", "-t", str(topology), "--party-dir", str(d)]) == 0
        assert mpc_agg_main(["token", "--party-dir", str(d), "--client", "alice", "-o",
                             str(d / "outbox")]) == 0  # fmt: skip
    capsys.readouterr()

    assert foreign_secrets(dirs) == []
    publics = [{public_key_of((d / n).read_bytes()) for n in PRIVATE_FILES} - {None} for d in dirs]
    assert [len(p) for p in publics] == [3, 3, 3]  # party link, HTTPS and signing keys
    for i, d in enumerate(dirs):  # each directory's keys are the ones its own card names
        card = read_card(d)
        assert card.index == i
        signing = public_key_of((d / "signing.key").read_bytes())
        assert signing is not None and signing.endswith(bytes.fromhex(card.signing_key))

    # The checks themselves: another party's key, even re-encoded, or its token, is found.
    key = serialization.load_pem_private_key((dirs[1] / "https.key").read_bytes(), None)
    (dirs[0] / "backup.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    (dirs[2] / "notes.txt").write_bytes(b"token: " + (dirs[0] / "token.key").read_bytes())
    assert foreign_secrets(dirs) == [
        f"{dirs[0] / 'backup.pem'} holds a secret of party 1",
        f"{dirs[2] / 'notes.txt'} holds a secret of party 0",
    ]


# -- a round across network namespaces -------------------------------------------------------


@pytest.fixture
def lab_ready() -> None:
    reason = netns_lab.unavailable()
    if reason is not None:
        pytest.skip(f"network namespace lab unavailable: {reason}")


def _namespace_of(pid: int) -> str:
    return subprocess.run(
        ["ip", "netns", "identify", str(pid)], capture_output=True, text=True, timeout=10
    ).stdout.strip()


@pytest.mark.netns
@pytest.mark.processes
@pytest.mark.timeout(180)
def test_dp_round_across_namespaces(tmp_path: Path, lab_ready: None) -> None:
    cli = netns_lab.mpc_agg_argv()
    vectors = {c: np.random.default_rng(k).uniform(-0.1, 0.1, 40) for k, c in enumerate(CLIENTS)}
    with netns_lab.federation(
        tmp_path, DP_TEMPLATE, clients=CLIENTS, delay_ms=25, rate_mbit=100, name="netns-dp"
    ) as fed:
        lab = fed.lab
        for i, proc in enumerate(fed.processes):  # each party runs in its own namespace
            assert _namespace_of(proc.pid) == lab.hosts[f"agg{i}"].ns
        topology = str(fed.topology)
        collector = ["-t", topology, "--tokens", str(fed.collector_grants)]

        fed.in_clients([*cli, "open", *collector, "--round", "r1", "--dim", "40"])
        submits = []
        for client, vector in vectors.items():  # each client on its own, all at once
            path = fed.client_grants(client) / "vector.npy"
            np.save(path, vector)
            grants = str(fed.client_grants(client))
            submits.append(
                [*cli, "submit", "-t", topology, "--tokens", grants, "--round", "r1", str(path)]
            )
        fed.in_clients_concurrently(submits)
        total, result = tmp_path / "total.npy", tmp_path / "result.npz"
        fed.in_clients([*cli, "collect", *collector, "--round", "r1", "--wait-clients", "4",
                        "--output", str(total), "--result", str(result)])  # fmt: skip
        verified = fed.in_clients([*cli, "verify", "-t", topology, str(result)])
        assert "vouched for by all 3 aggregators" in verified

        from mpc_agg import Topology
        from mpc_agg.collector import load_and_verify

        saved = load_and_verify(Topology.load(topology), result)
        assert saved.num_clients == 4 and saved.epsilon == 1.0
        assert saved.noise_stddev is not None and saved.noise_stddev > 0
        error = np.load(total) - sum(vectors.values())
        assert np.max(np.abs(error)) < 7 * saved.noise_stddev  # noise, nothing worse
        assert np.allclose(np.load(total), saved.total)
        pids = [p.pid for p in fed.processes]
        namespaces = [h.ns for h in lab.hosts.values()]

    # Clean stop (SIGTERM -> 0), nothing left behind, and still no secret out of place.
    assert fed.exit_statuses == [0, 0, 0], fed.log_tails()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in namespaces)
    assert foreign_secrets([fed.party_dir(i) for i in range(3)]) == []
