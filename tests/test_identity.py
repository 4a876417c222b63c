"""A party's identity (mpc_agg.identity), local provisioning (mpc_agg.provision) and the
pinned TLS contexts they feed (mpc_agg.transport.tls), in process.

README, "Security model"; docs/design.md, "Keys and identities". Handshakes run on one
asyncio loop over 127.0.0.1, as the party links (``loop.create_server``/``create_connection``)
and the HTTPS API do, each bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mpc_agg import ConfigError, Topology
from mpc_agg.config.fingerprint import fingerprint
from mpc_agg.errors import UsageError
from mpc_agg.identity import (
    CARD,
    CARD_FORMAT,
    COLLECTOR_TOKEN,
    HTTPS_CERT,
    HTTPS_KEY,
    PARTY_LINK_CERT,
    PARTY_LINK_KEY,
    PRIVATE_FILES,
    SIGNING_KEY,
    TOKEN_KEY,
    PartyCard,
    collector_token,
    generate_party_dir,
    load_party_dir,
    read_card,
    token_key,
)
from mpc_agg.provision import LOCAL_KEYS, TOPOLOGY_FILE, LocalDeployment, provision_local
from mpc_agg.transport.auth import client_token, verify_client_token, verify_collector_token
from mpc_agg.transport.tls import (
    https_client_context,
    https_server_context,
    party_client_context,
    party_server_context,
    pinned_index,
)

from .conftest import topology_doc, write_topology

T = TypeVar("T")
M = 3
TIMEOUT_S = 5.0
DOCUMENTED_FILES = {
    PARTY_LINK_KEY,
    PARTY_LINK_CERT,
    HTTPS_KEY,
    HTTPS_CERT,
    SIGNING_KEY,
    TOKEN_KEY,
    COLLECTOR_TOKEN,
    CARD,
}


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 4 * TIMEOUT_S)

    return asyncio.run(bounded())


@dataclass(frozen=True)
class Provisioned:
    template: Path
    cwd: Path
    deployment: LocalDeployment

    @property
    def topology(self) -> Topology:
        return self.deployment.topology()


def provision(directory: Path, name: str, m: int = M) -> Provisioned:
    directory.mkdir(parents=True, exist_ok=True)
    template = write_topology(directory, topology_doc(m, (m - 1) // 2, name=name))
    return Provisioned(template, directory, provision_local(template, cwd=directory))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """A provisioned 3-aggregator local topology (keys for every party)."""
    return provision(tmp_path_factory.mktemp("fed"), "ident3")


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """Another provisioned topology: other keys for the same indices."""
    return provision(tmp_path_factory.mktemp("other"), "other3")


# --------------------------------------------------------------------------- party directory


def test_generate_party_dir_writes_the_documented_files(tmp_path: Path) -> None:
    party = tmp_path / "party-1"
    card = generate_party_dir(party, 1, "127.0.0.1", 11001, 12001)
    assert {p.name for p in party.iterdir()} == DOCUMENTED_FILES
    assert mode(party) == 0o700
    for name in PRIVATE_FILES:
        assert mode(party / name) == 0o600, name
    assert set(PRIVATE_FILES) == {
        PARTY_LINK_KEY,
        HTTPS_KEY,
        SIGNING_KEY,
        TOKEN_KEY,
        COLLECTOR_TOKEN,
    }
    assert (party / PARTY_LINK_CERT).read_text() == card.party_cert
    assert (party / HTTPS_CERT).read_text() == card.http_cert
    assert yaml.safe_load((party / CARD).read_text()) == {
        "format": CARD_FORMAT,
        "index": 1,
        "card": card.entry(),
    }
    assert read_card(party) == card
    assert (card.index, card.host, card.mpc_port, card.http_port) == (1, "127.0.0.1", 11001, 12001)

    # Each private key is of the documented kind and matches the public card.
    link = serialization.load_pem_private_key((party / PARTY_LINK_KEY).read_bytes(), None)
    https = serialization.load_pem_private_key((party / HTTPS_KEY).read_bytes(), None)
    signing = serialization.load_pem_private_key((party / SIGNING_KEY).read_bytes(), None)
    assert isinstance(link, ec.EllipticCurvePrivateKey) and link.curve.name == "secp256r1"
    assert isinstance(https, ec.EllipticCurvePrivateKey) and https.curve.name == "secp256r1"
    assert isinstance(signing, Ed25519PrivateKey)
    raw = signing.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert raw.hex() == card.signing_key
    for name in (TOKEN_KEY, COLLECTOR_TOKEN):
        text = (party / name).read_text()
        assert text.endswith("\n") and len(bytes.fromhex(text.strip())) == 32
    assert token_key(party) != bytes.fromhex(collector_token(party))


def test_generate_party_dir_refuses_to_overwrite(tmp_path: Path) -> None:
    party = tmp_path / "p"
    generate_party_dir(party, 0, "127.0.0.1", 11001, 12001)
    before = {p.name: p.read_bytes() for p in party.iterdir()}
    with pytest.raises(ConfigError, match="keys are never overwritten") as info:
        generate_party_dir(party, 0, "127.0.0.1", 11001, 12001)
    for name in PRIVATE_FILES:
        assert name in info.value.detail
    assert {p.name: p.read_bytes() for p in party.iterdir()} == before
    # A single leftover key is enough to refuse.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / TOKEN_KEY).write_text("00" * 32)
    with pytest.raises(ConfigError, match=TOKEN_KEY):
        generate_party_dir(lone, 0, "127.0.0.1", 11001, 12001)
    assert [p.name for p in lone.iterdir()] == [TOKEN_KEY]


def test_cards_load_into_a_topology_each_party_loads_its_own_directory(tmp_path: Path) -> None:
    doc = topology_doc(M, 1, name="cards")
    cards: list[PartyCard] = []
    for i, entry in enumerate(doc["aggregators"]):
        cards.append(
            generate_party_dir(
                tmp_path / f"p{i}", i, entry["host"], entry["mpc_port"], entry["http_port"]
            )
        )
    doc["aggregators"] = [card.entry() for card in cards]
    topology = Topology.load(write_topology(tmp_path, doc))  # via YAML, as parties read it
    assert topology.has_keys and not topology.insecure
    for card, address in zip(cards, topology.aggregators, strict=True):
        assert (address.party_cert, address.http_cert, address.signing_key) == (
            card.party_cert,
            card.http_cert,
            card.signing_key,
        )
        assert address.url == f"https://{card.host}:{card.http_port}"
        secrets = load_party_dir(tmp_path / f"p{card.index}", address)
        assert secrets.party_link == (
            secrets.directory / PARTY_LINK_CERT,
            secrets.directory / PARTY_LINK_KEY,
        )
        assert secrets.credentials.client_key == token_key(tmp_path / f"p{card.index}")
        text = repr(secrets) + repr(secrets.credentials)
        assert "hidden" in text and secrets.credentials.collector_token not in text


# --------------------------------------------------------------------------- provisioning


def test_provision_local_writes_a_keyed_topology_next_to_the_party_dirs(fed: Provisioned) -> None:
    out = (fed.cwd / "data" / LOCAL_KEYS).resolve()
    assert fed.deployment.topology_path == out / TOPOLOGY_FILE
    assert fed.deployment.party_dirs == tuple(out / f"party-{i}" for i in range(M))
    assert mode(out) == 0o700
    topology = fed.topology
    assert topology.has_keys and topology.data_dir == (fed.cwd / "data").resolve()
    template = Topology.load(fed.template)
    assert not template.has_keys
    for a, t in zip(topology.aggregators, template.aggregators, strict=True):
        assert (a.host, a.mpc_port, a.http_port, a.scheme) == (
            t.host,
            t.mpc_port,
            t.http_port,
            "https",
        )
        party = fed.deployment.party_dirs[a.index]
        assert mode(party) == 0o700 and {f.name for f in party.iterdir()} == DOCUMENTED_FILES
        assert all(mode(party / name) == 0o600 for name in PRIVATE_FILES)
        load_party_dir(party, a)
    assert LocalDeployment.open(out) == fed.deployment


def test_provision_local_twice_reuses_the_keys(fed: Provisioned, tmp_path: Path) -> None:
    first = fed.topology
    tokens = fed.deployment.collector_tokens(), fed.deployment.client_tokens("alice")
    again = provision_local(fed.template, cwd=fed.cwd)
    assert again == fed.deployment
    assert fingerprint(again.topology()) == fingerprint(first)
    assert (again.collector_tokens(), again.client_tokens("alice")) == tokens

    # A changed setting keeps the keys (and changes the fingerprint of that setting only).
    doc = yaml.safe_load(fed.template.read_text())
    doc["rounds"]["min_clients"] = 3
    changed = write_topology(tmp_path, doc)
    redone = provision_local(changed, cwd=fed.cwd)
    assert redone.topology().aggregators == first.aggregators
    assert redone.collector_tokens() == tokens[0]
    assert fingerprint(redone.topology()) != fingerprint(first)
    provision_local(fed.template, cwd=fed.cwd)  # as the module fixture had it


def test_provision_local_refuses_a_changed_address(tmp_path: Path) -> None:
    p = provision(tmp_path, "moved")
    before = p.deployment.topology_path.read_bytes()
    doc = yaml.safe_load(p.template.read_text())
    doc["aggregators"][1]["host"] = "localhost"  # same ports, another address
    (tmp_path / "changed").mkdir()
    moved = write_topology(tmp_path / "changed", doc)
    with pytest.raises(ConfigError) as info:
        provision_local(moved, cwd=tmp_path)
    assert info.value.path == "aggregators[1]"
    assert "were made for" in info.value.detail and "provision afresh" in info.value.detail
    assert p.deployment.topology_path.read_bytes() == before  # nothing rewritten


def test_provision_local_refuses_a_topology_that_already_has_keys(fed: Provisioned) -> None:
    before = fed.deployment.topology_path.read_bytes()
    with pytest.raises(ConfigError) as info:
        provision_local(fed.deployment.topology_path, cwd=fed.cwd)
    assert info.value.path == "aggregators" and "--party-dir" in info.value.detail
    assert fed.deployment.topology_path.read_bytes() == before


def test_deployment_tokens_verify_at_their_own_aggregator_only(fed: Provisioned) -> None:
    topology = fed.topology
    secrets = [
        load_party_dir(d, a)
        for d, a in zip(fed.deployment.party_dirs, topology.aggregators, strict=True)
    ]
    alice = fed.deployment.client_tokens("alice")
    collector = fed.deployment.collector_tokens()
    assert len(set(alice)) == M and len(set(collector)) == M
    for i, s in enumerate(secrets):
        verify_client_token(s.credentials.client_key, "alice", alice[i])
        verify_collector_token(s.credentials.collector_token, collector[i])
        assert alice[i] == client_token(token_key(fed.deployment.party_dirs[i]), "alice")
    client = fed.deployment.client("alice")
    assert client.client_id == "alice"
    assert fed.deployment.collector().topology == topology


# --------------------------------------------------------------------------- separation


def _private_forms(path: Path) -> list[bytes]:
    """Every form in which the secret of private file ``path`` could leak into another
    file: its bytes, its base64 body, and the raw secret in hex."""
    data = path.read_bytes()
    forms = [data, data.strip()]
    if data.startswith(b"-----BEGIN"):
        body = b"".join(line for line in data.splitlines() if not line.startswith(b"-----"))
        forms.append(body)
        key = serialization.load_pem_private_key(data, None)
        if isinstance(key, Ed25519PrivateKey):
            raw = key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        else:
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            raw = key.private_numbers().private_value.to_bytes(32, "big")
        forms += [raw.hex().encode(), base64.b64encode(raw)]
    else:
        forms.append(bytes.fromhex(data.decode().strip()))
    return forms


def test_no_party_directory_holds_another_partys_private_keys(fed: Provisioned) -> None:
    dirs = fed.deployment.party_dirs
    public = [fed.deployment.topology_path]
    for i, mine in enumerate(dirs):
        files = sorted(p for p in mine.iterdir() if p.is_file())
        assert {p.name for p in files} == DOCUMENTED_FILES
        contents = {p: p.read_bytes() for p in files}
        for j, theirs in enumerate(dirs):
            if j == i:
                continue
            for name in PRIVATE_FILES:
                for form in _private_forms(theirs / name):
                    for path, data in contents.items():
                        assert form not in data, f"party-{j}/{name} leaks into {path}"
    for i, mine in enumerate(dirs):  # nor does the public topology or any card
        for name in PRIVATE_FILES:
            for form in _private_forms(mine / name):
                for path in public + [d / CARD for d in dirs]:
                    assert form not in path.read_bytes(), f"party-{i}/{name} is in {path}"


# --------------------------------------------------------------------------- pinned TLS


@dataclass
class Exchange:
    """One TLS connection on the running loop: what each side saw."""

    served: list[int | None] = field(default_factory=list)  # pinned index of each client
    reply: bytes = b""
    client_error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.reply == b"ok"


async def exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    pins: dict[int, str] | None = None,
) -> Exchange:
    """Serve one connection on 127.0.0.1 with ``server_ctx``; connect with ``client_ctx``;
    the server records the pinned index of the client's certificate and answers b"ok"."""
    result = Exchange()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        result.served.append(pinned_index(der, pins or {}))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        kwargs: dict[str, Any] = {"ssl": client_ctx}
        if server_hostname is not None:
            kwargs["server_hostname"] = server_hostname
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, **kwargs), TIMEOUT_S
        )
        try:
            # TLS 1.3: a client certificate the server refuses shows only at the first read.
            result.reply = await asyncio.wait_for(reader.read(2), TIMEOUT_S)
        finally:
            writer.close()
    except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
        result.client_error = exc
    finally:
        server.close()
        await server.wait_closed()
    return result


def party_files(p: Provisioned, index: int) -> tuple[Path, Path]:
    d = p.deployment.party_dirs[index]
    return d / PARTY_LINK_CERT, d / PARTY_LINK_KEY


def party_pins(p: Provisioned) -> dict[int, str]:
    return {a.index: str(a.party_cert) for a in p.topology.aggregators}


@pytest.mark.parametrize(("dialler", "listener"), [(0, 1), (0, 2), (1, 2)])
def test_party_link_contexts_accept_the_pinned_peer(
    fed: Provisioned, dialler: int, listener: int
) -> None:
    # As MpycNetwork: the listener accepts the parties below it, the dialler pins one.
    pins = party_pins(fed)
    server = party_server_context(party_files(fed, listener), [pins[j] for j in range(listener)])
    client = party_client_context(party_files(fed, dialler), pins[listener])
    result = run(exchange(server, client, pins=pins))
    assert result.ok, result
    assert result.served == [dialler]
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_party_link_listener_refuses_another_partys_certificate(
    fed: Provisioned, other: Provisioned
) -> None:
    pins = party_pins(fed)
    server = party_server_context(party_files(fed, 1), [pins[0]])  # party 1 accepts only 0
    for intruder in (
        party_files(fed, 2),  # a party of this topology, but not one that dials party 1
        party_files(other, 0),  # party 0 of another topology
    ):
        client = party_client_context(intruder, pins[1])  # it trusts party 1's certificate
        result = run(exchange(server, client, pins=pins))
        assert not result.ok and result.served == [], result


def test_party_link_dialler_refuses_a_listener_with_another_certificate(
    fed: Provisioned, other: Provisioned
) -> None:
    pins = party_pins(fed)
    client = party_client_context(party_files(fed, 0), pins[2])  # party 0 dials party 2
    for impostor in (party_files(fed, 1), party_files(other, 2)):
        server = party_server_context(impostor, [pins[0]])
        result = run(exchange(server, client, pins=pins))
        assert isinstance(result.client_error, ssl.SSLCertVerificationError), result
        assert result.served == []


def test_pinned_index_names_exactly_the_pinned_certificate(
    fed: Provisioned, other: Provisioned
) -> None:
    pins = party_pins(fed)
    for i, pem in pins.items():
        assert pinned_index(ssl.PEM_cert_to_DER_cert(pem), pins) == i
    stranger = ssl.PEM_cert_to_DER_cert(str(other.topology.aggregators[0].party_cert))
    assert pinned_index(stranger, pins) is None
    assert pinned_index(None, pins) is None


def test_https_client_context_accepts_its_aggregator_only(
    fed: Provisioned, other: Provisioned
) -> None:
    addresses = fed.topology.aggregators
    dirs = fed.deployment.party_dirs

    def server_of(d: Path) -> ssl.SSLContext:
        return https_server_context((d / HTTPS_CERT, d / HTTPS_KEY))

    client = https_client_context(addresses[0])
    assert client is not None and client.check_hostname
    result = run(exchange(server_of(dirs[0]), client, server_hostname=addresses[0].host))
    assert result.ok, result
    # Same host name in the certificate, but not the one pinned for aggregator 0.
    for wrong in (dirs[1], other.deployment.party_dirs[0]):
        result = run(exchange(server_of(wrong), client, server_hostname=addresses[0].host))
        assert isinstance(result.client_error, ssl.SSLCertVerificationError), result


def test_https_client_context_by_scheme(fed: Provisioned) -> None:
    address = fed.topology.aggregators[1]
    assert https_client_context(address) is https_client_context(address)  # cached per pin
    plain = Topology.from_dict(dict(topology_doc(M, 1, name="plain"), insecure=True))
    assert https_client_context(plain.aggregators[1]) is None
    template = Topology.load(fed.template)
    with pytest.raises(UsageError, match="no http_cert .* template"):
        https_client_context(template.aggregators[1])
