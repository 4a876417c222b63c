"""TLS contexts with pinned certificates (mpc_agg.transport.tls) over the keys of party
directories (mpc_agg.identity, provisioned by mpc_agg.provision), and bearer tokens
(mpc_agg.transport.auth).

Handshakes are real TLS over 127.0.0.1, one thread per server with bounded timeouts. The
party-link contexts are used as :class:`mpc_agg.mpc.runtime.MpycNetwork` uses them: a party
listens for the parties below it and dials the parties above it, pinning each one's
``party_cert``; clients pin each aggregator's ``http_cert``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg import Topology
from mpc_agg.config.schema import AggregatorAddress
from mpc_agg.errors import ConfigError, PeerError, UsageError
from mpc_agg.identity import (
    CERT_DAYS,
    COLLECTOR_TOKEN,
    HTTPS_CERT,
    HTTPS_KEY,
    PARTY_LINK_CERT,
    PARTY_LINK_KEY,
    PRIVATE_FILES,
    SIGNING_KEY,
    TOKEN_KEY,
    collector_token,
    generate_party_dir,
    load_party_dir,
    token_key,
)
from mpc_agg.provision import LocalDeployment, provision_local
from mpc_agg.transport import tls
from mpc_agg.transport.auth import (
    Forbidden,
    Unauthenticated,
    bearer_token,
    client_token,
    verify_client_token,
    verify_collector_token,
)
from tests.conftest import topology_doc, write_topology

M = 3
TIMEOUT_S = 5.0


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@dataclass(frozen=True)
class Keys:
    """A provisioned local topology: its template, its keyed topology, its party dirs."""

    template: Path
    deployment: LocalDeployment

    @property
    def topology(self) -> Topology:
        return self.deployment.topology()

    def dir(self, index: int) -> Path:
        return self.deployment.party_dirs[index]

    def party(self, index: int) -> tuple[Path, Path]:
        """(certificate, key) party ``index`` presents on party links."""
        return self.dir(index) / PARTY_LINK_CERT, self.dir(index) / PARTY_LINK_KEY

    def https(self, index: int) -> tuple[Path, Path]:
        """(certificate, key) of aggregator ``index``'s HTTPS API."""
        return self.dir(index) / HTTPS_CERT, self.dir(index) / HTTPS_KEY

    def pins(self) -> dict[int, str]:
        return {a.index: str(a.party_cert) for a in self.topology.aggregators}


def provision(directory: Path, name: str, m: int = M) -> Keys:
    template = write_topology(directory, topology_doc(m, (m - 1) // 2, name=name))
    return Keys(template, provision_local(template, cwd=directory))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A 3-aggregator local topology with keys for every party."""
    return provision(tmp_path_factory.mktemp("keys"), "tls3")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """A second topology, hence other certificates for the same indices."""
    return provision(tmp_path_factory.mktemp("other"), "other3")


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


# --------------------------------------------------------------------------- handshakes


@dataclass
class Handshake:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    client_der: bytes | None = None
    version: str | None = None
    reply: bytes = b""

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.reply == b"ok"


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> Handshake:
    """One TLS connection over 127.0.0.1; the server answers b"ok" once its handshake is done.

    With TLS 1.3 the client finishes its handshake before the server has checked the client's
    certificate, so a refused client certificate shows on the client only at the first read.
    """
    result = Handshake()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT_S)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(TIMEOUT_S)
                    with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                        result.client_der = tls_conn.getpeercert(binary_form=True)
                        tls_conn.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                result.server_error = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as conn:
                    result.version = conn.version()
                    result.reply = conn.recv(2)
        except (OSError, ssl.SSLError) as exc:
            result.client_error = exc
        finally:
            thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    return result


def listener_context(keys: Keys, index: int) -> ssl.SSLContext:
    """As MpycNetwork for party ``index``: accept the parties below it."""
    pins = keys.pins()
    return tls.party_server_context(keys.party(index), [pins[j] for j in range(index)])


def dialler_context(keys: Keys, index: int, peer: int) -> ssl.SSLContext:
    """As MpycNetwork for party ``index`` dialling party ``peer``."""
    return tls.party_client_context(keys.party(index), keys.pins()[peer])


# --------------------------------------------------------------------------- certificates


def test_party_certs_are_self_signed_and_name_the_party(keys: Keys) -> None:
    certs = [load_cert(str(a.party_cert)) for a in keys.topology.aggregators]
    assert len({c.tbs_certificate_bytes for c in certs}) == M
    for i, cert in enumerate(certs):
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == [f"mpc_agg party {i}"]
        assert cert.issuer == cert.subject
        cert.verify_directly_issued_by(cert)  # self-signed: no CA anywhere
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert not constraints.value.ca and constraints.critical
        # Pinned, not named: no SubjectAltName, and no host name is checked on party links.
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert CERT_DAYS <= days <= CERT_DAYS + 1


def test_http_certs_name_the_aggregator_host(keys: Keys, tmp_path: Path) -> None:
    for a in keys.topology.aggregators:
        cert = load_cert(str(a.http_cert))
        cert.verify_directly_issued_by(cert)
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [c.value for c in cn] == [f"mpc_agg https {a.index}"]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert san.get_values_for_type(x509.DNSName) == []
    named = generate_party_dir(tmp_path / "named", 0, "localhost", 1001, 2001)
    san = (
        load_cert(named.http_cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == []


# --------------------------------------------------------------------------- party links


@pytest.mark.parametrize(("dialler", "listener"), [(0, 1), (0, 2), (1, 2)])
def test_party_link_handshake_with_mutual_auth(keys: Keys, dialler: int, listener: int) -> None:
    # MPyC's order: party `dialler` < `listener` connects; `listener` listens.
    result = handshake(
        listener_context(keys, listener), dialler_context(keys, dialler, listener), None
    )
    assert result.ok, result
    assert result.version == "TLSv1.3"
    assert tls.pinned_index(result.client_der, keys.pins()) == dialler


def test_party_link_survives_strict_x509_checks(keys: Keys) -> None:
    # Python 3.13's create_default_context adds VERIFY_X509_STRICT; the certificates must pass.
    server_ctx, client_ctx = listener_context(keys, 1), dialler_context(keys, 0, 1)
    for ctx in (server_ctx, client_ctx):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert handshake(server_ctx, client_ctx, None).ok


def test_party_link_refuses_a_client_from_another_topology(keys: Keys, other_keys: Keys) -> None:
    # Other topology's party 0, trusting our party 1: our party 1 refuses its certificate.
    intruder = tls.party_client_context(other_keys.party(0), keys.pins()[1])
    result = handshake(listener_context(keys, 1), intruder, None)
    assert not result.ok
    assert isinstance(result.server_error, ssl.SSLError)
    assert result.client_der is None


def test_party_link_refuses_a_party_that_should_not_dial(keys: Keys) -> None:
    # Party 1 accepts only party 0: party 2 (which party 1 dials, not the other way) is out.
    result = handshake(listener_context(keys, 1), dialler_context(keys, 2, 1), None)
    assert not result.ok and isinstance(result.server_error, ssl.SSLError)
    assert result.client_der is None


def test_party_link_refuses_a_server_from_another_topology(keys: Keys, other_keys: Keys) -> None:
    impostor = tls.party_server_context(other_keys.party(1), [keys.pins()[0]])
    result = handshake(impostor, dialler_context(keys, 0, 1), None)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_party_link_refuses_the_wrong_party(keys: Keys) -> None:
    # Party 0 dialling party 2 reaches party 1: the pin (not a name) catches it.
    result = handshake(listener_context(keys, 1), dialler_context(keys, 0, 2), None)
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_party_link_refuses_tls_1_2(keys: Keys) -> None:
    old = dialler_context(keys, 0, 1)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    result = handshake(listener_context(keys, 1), old, None)
    assert not result.ok and isinstance(result.client_error, ssl.SSLError)


# --------------------------------------------------------------------------- HTTPS


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_handshake_with_server_and_client_contexts(tmp_path: Path, host: str) -> None:
    card = generate_party_dir(tmp_path / "p", 1, host, 1001, 2001)
    address = AggregatorAddress(1, host, 1001, 2001, http_cert=card.http_cert)
    server_ctx = tls.https_server_context((tmp_path / "p" / HTTPS_CERT, tmp_path / "p" / HTTPS_KEY))
    client_ctx = tls.https_client_context(address)
    assert client_ctx is not None
    assert server_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_ctx.verify_mode == ssl.CERT_NONE  # clients present tokens, not certificates
    result = handshake(server_ctx, client_ctx, host)
    assert result.ok, result
    assert result.version in {"TLSv1.2", "TLSv1.3"}


def test_https_client_refuses_a_server_from_another_topology(keys: Keys, other_keys: Keys) -> None:
    client = tls.https_client_context(keys.topology.aggregators[0])
    assert client is not None
    result = handshake(tls.https_server_context(other_keys.https(0)), client, "127.0.0.1")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_https_client_refuses_a_name_not_in_the_certificate(keys: Keys) -> None:
    client = tls.https_client_context(keys.topology.aggregators[0])
    assert client is not None
    result = handshake(tls.https_server_context(keys.https(0)), client, "127.0.0.2")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_contexts_refuse_a_certificate_with_another_key(keys: Keys, tmp_path: Path) -> None:
    crt, key = tmp_path / "x.crt", tmp_path / "x.key"
    crt.write_bytes(keys.party(0)[0].read_bytes())
    key.write_bytes(keys.party(1)[1].read_bytes())  # party 1's key
    key.chmod(0o600)
    pins = keys.pins()
    for build in (
        lambda: tls.party_server_context((crt, key), [pins[0]]),
        lambda: tls.party_client_context((crt, key), pins[1]),
        lambda: tls.https_server_context((crt, key)),
    ):
        with pytest.raises(ssl.SSLError) as info:
            build()
        assert "PRIVATE KEY" not in str(info.value)
    with pytest.raises(ssl.SSLError):
        tls.party_client_context(keys.party(0), "-----BEGIN CERTIFICATE-----\nAAAA\n")


# --------------------------------------------------------------------------- party directories


def test_provisioned_keys_are_0600_in_0700_directories(keys: Keys) -> None:
    for i in range(M):
        assert mode(keys.dir(i)) == 0o700
        for name in PRIVATE_FILES:
            assert mode(keys.dir(i) / name) == 0o600, (i, name)


def test_load_party_dir_for_one_party_and_loose_keys(keys: Keys, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(keys.dir(1), copy)  # a party's machine holds its own directory only
    addresses = keys.topology.aggregators
    secrets = load_party_dir(copy, addresses[1])
    assert secrets.directory == copy.resolve()
    assert secrets.party_link == (copy / PARTY_LINK_CERT, copy / PARTY_LINK_KEY)
    assert secrets.https == (copy / HTTPS_CERT, copy / HTTPS_KEY)
    for index in (0, 2):  # another party's directory
        with pytest.raises(ConfigError) as info:
            load_party_dir(copy, addresses[index])
        assert info.value.path == f"aggregators[{index}].party_cert"
        assert "wrong party directory or topology" in info.value.detail
    for name in PRIVATE_FILES:
        path = copy / name
        path.chmod(0o640)
        with pytest.raises(ConfigError) as info:
            load_party_dir(copy, addresses[1])
        assert f"chmod 600 {path}" in info.value.detail and "0640" in info.value.detail
        path.chmod(0o604)
        with pytest.raises(ConfigError, match="group or others"):
            load_party_dir(copy, addresses[1])
        path.chmod(0o600)
    load_party_dir(copy, addresses[1])
    (copy / PARTY_LINK_KEY).unlink()
    with pytest.raises(ConfigError, match="does not exist; this is not a party directory"):
        load_party_dir(copy, addresses[1])


def test_load_party_dir_refuses_a_mismatched_topology(
    keys: Keys, other_keys: Keys, tmp_path: Path
) -> None:
    mine = keys.topology.aggregators
    with pytest.raises(ConfigError) as info:
        load_party_dir(other_keys.dir(0), mine[0])  # index 0 of another topology
    assert info.value.path == "aggregators[0].party_cert"
    # Same certificates, another signing key: refused at signing_key.
    mixed = tmp_path / "mixed"
    shutil.copytree(keys.dir(0), mixed)
    (mixed / SIGNING_KEY).unlink()
    shutil.copy2(other_keys.dir(0) / SIGNING_KEY, mixed / SIGNING_KEY)
    with pytest.raises(ConfigError) as info:
        load_party_dir(mixed, mine[0])
    assert info.value.path == "aggregators[0].signing_key"
    # The HTTPS certificate is checked too.
    (mixed / HTTPS_CERT).write_text((other_keys.dir(0) / HTTPS_CERT).read_text())
    with pytest.raises(ConfigError) as info:
        load_party_dir(mixed, mine[0])
    assert info.value.path == "aggregators[0].http_cert"


def test_load_party_dir_refuses_a_template(keys: Keys) -> None:
    template = Topology.load(keys.template)
    assert not template.has_keys
    with pytest.raises(ConfigError) as info:
        load_party_dir(keys.dir(2), template.aggregators[2])
    assert info.value.path == "aggregators[2]"
    assert "template" in info.value.detail and "local launcher" in info.value.detail


def test_token_files_are_checked(keys: Keys, tmp_path: Path) -> None:
    party = tmp_path / "party"
    shutil.copytree(keys.dir(0), party)
    address = keys.topology.aggregators[0]
    secret = bytes(range(100, 132))
    path = party / TOKEN_KEY
    for text in (secret.hex(), secret.hex() + "\n", secret.hex().upper() + "\r\n"):
        path.write_text(text, newline="")
        assert token_key(party) == secret
        assert load_party_dir(party, address).credentials.client_key == secret
    for bad in (secret.hex()[:-1], secret.hex() + "0", "zz" * 32, ""):
        path.write_text(bad, newline="")
        with pytest.raises(ConfigError, match="64 hex characters") as info:
            load_party_dir(party, address)
        assert str(path) in info.value.detail
        assert not bad or bad not in str(info.value)
    path.write_text(secret.hex())
    token = party / COLLECTOR_TOKEN
    token.chmod(0o660)
    with pytest.raises(ConfigError, match="chmod 600"):
        collector_token(party)
    token.unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        collector_token(party)


# --------------------------------------------------------------------------- tokens


def test_provisioned_tokens_verify_per_client_and_per_aggregator(keys: Keys) -> None:
    topology = keys.topology
    credentials = [
        load_party_dir(keys.dir(i), topology.aggregators[i]).credentials for i in range(M)
    ]
    assert len({c.client_key for c in credentials}) == M
    tokens = {c: keys.deployment.client_tokens(c) for c in ("alice", "bob")}
    for client_id, per_aggregator in tokens.items():
        assert len(set(per_aggregator)) == M  # differ per aggregator
        for creds, token in zip(credentials, per_aggregator, strict=True):
            verify_client_token(creds.client_key, client_id, token)
            assert creds.client_key.hex() not in token
    assert set(tokens["alice"]).isdisjoint(tokens["bob"])  # and per client
    with pytest.raises(Forbidden):
        verify_client_token(credentials[0].client_key, "alice", tokens["alice"][1])
    collector = keys.deployment.collector_tokens()
    assert len(set(collector)) == M  # each aggregator issues its own
    for i, creds in enumerate(credentials):
        verify_collector_token(creds.collector_token, collector[i])
        with pytest.raises(Forbidden):
            verify_collector_token(creds.collector_token, collector[(i + 1) % M])


# --------------------------------------------------------------------------- auth


KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def test_client_token_is_the_documented_hmac() -> None:
    import hashlib
    import hmac

    expected = hmac.new(KEY, b"mpc_agg/client-token/v1\x00alice", hashlib.sha256).hexdigest()
    assert client_token(KEY, "alice") == expected
    assert len(expected) == 64 and expected == expected.lower()
    assert client_token(KEY, "alice") != client_token(OTHER_KEY, "alice")


def test_client_token_refuses_a_short_key() -> None:
    with pytest.raises(UsageError, match="at least 16 bytes, got 3"):
        client_token(b"abc", "alice")


def test_verify_client_token() -> None:
    good = client_token(KEY, "alice")
    assert verify_client_token(KEY, "alice", good) is None
    for missing in (None, ""):
        with pytest.raises(Unauthenticated) as info:
            verify_client_token(KEY, "alice", missing)
        assert info.value.code == "unauthenticated"
    for wrong in (client_token(KEY, "bob"), client_token(OTHER_KEY, "alice"), good[:-1], "é"):
        with pytest.raises(Forbidden) as info:
            verify_client_token(KEY, "alice", wrong)
        assert info.value.code == "forbidden"
        assert good not in str(info.value) and wrong not in str(info.value)
    assert issubclass(Unauthenticated, PeerError) and issubclass(Forbidden, PeerError)


def test_verify_collector_token() -> None:
    expected = "c0ffee" * 10
    assert verify_collector_token(expected, expected) is None
    with pytest.raises(Unauthenticated):
        verify_collector_token(expected, None)
    with pytest.raises(Unauthenticated):
        verify_collector_token(expected, "")
    with pytest.raises(Forbidden) as info:
        verify_collector_token(expected, expected[:-1] + "f")
    assert expected not in str(info.value)
    with pytest.raises(UsageError):
        verify_collector_token("", "")


@pytest.mark.parametrize(
    "header, token",
    [
        (None, None),
        ("Bearer abc123", "abc123"),
        ("bearer abc123", "abc123"),
        ("BEARER  abc123 ", "abc123"),
        ("Bearer a-b.c_d~e+f/g==", "a-b.c_d~e+f/g=="),
    ],
)
def test_bearer_token_parses(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    "header",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer abc def",
        "Bearer abc=def",
        "Bearer\tabc",
        "Bearerabc",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "abc123",
        "Bearer é",
    ],
)
def test_bearer_token_refuses_malformed_headers(header: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        bearer_token(header)
    assert "Bearer <token>" in info.value.detail
    assert "dXNlcjpwYXNz" not in info.value.detail  # credentials are never echoed


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=16, max_size=64),
    a=st.text(min_size=1, max_size=40),
    b=st.text(min_size=1, max_size=40),
)
def test_a_token_for_one_client_never_verifies_for_another(key: bytes, a: str, b: str) -> None:
    if a == b:
        b = a + "x"
    with pytest.raises(Forbidden):
        verify_client_token(key, b, client_token(key, a))
