"""TLS files (scripts/make_certs.py, mpc_agg.transport.tls) and tokens (scripts/make_secrets.py,
mpc_agg.transport.auth).

The scripts run as subprocesses, as users run them. Handshakes are real TLS over 127.0.0.1,
one thread per server with bounded timeouts; the MPyC party handshake mirrors
``mpyc.runtime.Runtime.start`` (mpyc 0.11) line for line.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg.errors import ConfigError, PeerError, UsageError
from mpc_agg.transport import tls
from mpc_agg.transport.auth import (
    Forbidden,
    Unauthenticated,
    bearer_token,
    client_token,
    load_secret,
    verify_client_token,
    verify_collector_token,
)
from tests.conftest import ROOT, free_ports, topology_doc, write_topology

MAKE_CERTS = ROOT / "scripts" / "make_certs.py"
MAKE_SECRETS = ROOT / "scripts" / "make_secrets.py"
M = 3
TIMEOUT_S = 5.0


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@dataclass(frozen=True)
class CertDir:
    root: Path  # the working directory make_certs ran in
    config: Path
    tls_dir: Path
    stdout: str


def make_cert_dir(directory: Path, name: str, m: int = M) -> CertDir:
    config = write_topology(directory, topology_doc(m, (m - 1) // 2, name=name))
    proc = run_script(MAKE_CERTS, str(config), cwd=directory)
    assert proc.returncode == 0, proc.stderr
    return CertDir(directory, config, directory / "tls" / name, proc.stdout)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    """make_certs run once on a 3-aggregator topology, with the default output directory."""
    return make_cert_dir(tmp_path_factory.mktemp("certs"), "tls3")


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertDir:
    """A second topology, hence a different CA."""
    return make_cert_dir(tmp_path_factory.mktemp("other"), "other3")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- handshakes


@dataclass
class Handshake:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    client_cert_seen: dict | None = None
    version: str | None = None
    reply: bytes = b""

    @property
    def ok(self) -> bool:
        return self.server_error is None and self.client_error is None and self.reply == b"ok"


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str
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
                        result.client_cert_seen = tls_conn.getpeercert()
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


def mpyc_server_context(pid: int) -> ssl.SSLContext:
    """As mpyc.runtime.Runtime.start() for the party that listens (paths relative to cwd)."""
    crtfile = os.path.join(".config", f"party_{pid}.crt")
    keyfile = os.path.join(".config", f"party_{pid}.key")
    cafile = os.path.join(".config", "mpyc_ca.crt")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(crtfile, keyfile=keyfile)
    context.load_verify_locations(cafile=cafile)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def mpyc_client_context(pid: int) -> ssl.SSLContext:
    """As mpyc.runtime.Runtime.start() for the party that connects."""
    crtfile = os.path.join(".config", f"party_{pid}.crt")
    keyfile = os.path.join(".config", f"party_{pid}.key")
    cafile = os.path.join(".config", "mpyc_ca.crt")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.load_cert_chain(crtfile, keyfile=keyfile)
    context.load_verify_locations(cafile=cafile)
    return context


# --------------------------------------------------------------------------- make_certs


def test_make_certs_writes_every_file_with_private_keys_0600(certs: CertDir) -> None:
    expected = tls.required_files(certs.tls_dir, M) + [tls.ca_key_path(certs.tls_dir)]
    assert len(set(expected)) == 3 + 4 * M
    for path in expected:
        assert path.is_file(), path
        assert f"wrote {path.relative_to(certs.root)}" in certs.stdout
    keys = tls.private_key_files(certs.tls_dir, M)
    assert len(keys) == 1 + 2 * M
    for key in keys:
        assert mode(key) == 0o600, key
    assert mode(certs.tls_dir) == 0o700
    assert (
        tls.mpyc_ca_path(certs.tls_dir).read_bytes() == tls.ca_cert_path(certs.tls_dir).read_bytes()
    )
    tls.check_tls_dir(certs.tls_dir, M)


def test_party_certs_name_the_party_and_chain_to_the_ca(certs: CertDir) -> None:
    ca = load_cert(tls.ca_cert_path(certs.tls_dir))
    ca_constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_constraints.value.ca and ca_constraints.critical
    for i in range(M):
        cert = load_cert(tls.party_cert_paths(certs.tls_dir, i)[0])
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [a.value for a in cn] == [f"MPyC party {i}"] == [tls.party_hostname(i)]
        # No SubjectAltName at all: OpenSSL then checks MPyC's host name against the CN.
        with pytest.raises(x509.ExtensionNotFound):
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(eku) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
        cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong


def test_http_certs_name_the_aggregator_host(certs: CertDir) -> None:
    ca = load_cert(tls.ca_cert_path(certs.tls_dir))
    for i in range(M):
        cert = load_cert(tls.http_cert_paths(certs.tls_dir, i)[0])
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]


@pytest.mark.parametrize("client, server", [(0, 1), (0, 2), (1, 2)])
def test_mpyc_party_link_handshake_with_mutual_auth(
    certs: CertDir, monkeypatch: pytest.MonkeyPatch, client: int, server: int
) -> None:
    # MPyC: party `client` < `server` connects; `server` listens. Files relative to the cwd.
    monkeypatch.chdir(tls.mpyc_dir(certs.tls_dir))
    result = handshake(
        mpyc_server_context(server), mpyc_client_context(client), f"MPyC party {server}"
    )
    assert result.ok, result
    subject = dict(pair for rdn in result.client_cert_seen["subject"] for pair in rdn)
    assert subject["commonName"] == f"MPyC party {client}"


def test_mpyc_party_link_survives_strict_x509_checks(
    certs: CertDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python 3.13's create_default_context adds VERIFY_X509_STRICT; the certificates must pass.
    monkeypatch.chdir(tls.mpyc_dir(certs.tls_dir))
    server_ctx, client_ctx = mpyc_server_context(1), mpyc_client_context(0)
    for ctx in (server_ctx, client_ctx):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert handshake(server_ctx, client_ctx, "MPyC party 1").ok


def test_mpyc_party_link_refuses_a_client_from_another_ca(
    certs: CertDir, other_certs: CertDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tls.mpyc_dir(other_certs.tls_dir))
    intruder = mpyc_client_context(0)  # presents other CA's party 0 cert
    intruder.load_verify_locations(cafile=str(tls.ca_cert_path(certs.tls_dir)))  # trusts ours
    monkeypatch.chdir(tls.mpyc_dir(certs.tls_dir))
    result = handshake(mpyc_server_context(1), intruder, "MPyC party 1")
    assert not result.ok
    assert isinstance(result.server_error, ssl.SSLCertVerificationError)
    assert result.client_cert_seen is None


def test_mpyc_party_link_refuses_a_server_from_another_ca(
    certs: CertDir, other_certs: CertDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tls.mpyc_dir(other_certs.tls_dir))
    impostor = mpyc_server_context(1)
    monkeypatch.chdir(tls.mpyc_dir(certs.tls_dir))
    result = handshake(impostor, mpyc_client_context(0), "MPyC party 1")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_mpyc_party_link_refuses_the_wrong_party(
    certs: CertDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Party 0 dialling party 2 reaches party 1's certificate: the CN check catches it.
    monkeypatch.chdir(tls.mpyc_dir(certs.tls_dir))
    result = handshake(mpyc_server_context(1), mpyc_client_context(0), "MPyC party 2")
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)
    assert "mismatch" in str(result.client_error)


MPYC_PROGRAM = """
from mpyc.runtime import mpc

async def main():
    await mpc.start()
    total = mpc.sum(mpc.input(mpc.SecInt()(mpc.pid + 1)))
    print("total", await mpc.output(total), flush=True)
    await mpc.shutdown()

mpc.run(main())
"""


@pytest.mark.processes
def test_real_mpyc_parties_connect_with_ssl(certs: CertDir, tmp_path: Path) -> None:
    """Three MPyC processes run with --ssl from mpyc_dir(tls_dir) and compute a sum."""
    program = tmp_path / "sum.py"
    program.write_text(MPYC_PROGRAM)
    parties = [arg for port in free_ports(M) for arg in ("-P", f"127.0.0.1:{port}")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(program), *parties, "-I", str(i), "-T", "1", "--ssl"],
            cwd=tls.mpyc_dir(certs.tls_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(M)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=30)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert "total 6" in out and "connected via SSL" in out, out


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_https_handshake_with_server_and_client_contexts(certs: CertDir, hostname: str) -> None:
    server_ctx = tls.server_context(certs.tls_dir, 1)
    client_ctx = tls.client_context(certs.tls_dir)
    assert server_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED
    result = handshake(server_ctx, client_ctx, hostname)
    assert result.ok, result
    assert result.version in {"TLSv1.2", "TLSv1.3"}


def test_https_client_refuses_a_server_from_another_ca(
    certs: CertDir, other_certs: CertDir
) -> None:
    result = handshake(
        tls.server_context(certs.tls_dir, 0), tls.client_context(other_certs.tls_dir), "127.0.0.1"
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_https_client_refuses_a_name_not_in_the_certificate(certs: CertDir) -> None:
    result = handshake(
        tls.server_context(certs.tls_dir, 0), tls.client_context(certs.tls_dir), "127.0.0.2"
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError)


def test_make_certs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    config = write_topology(tmp_path, topology_doc(2, 0, name="twice"))
    out = tmp_path / "custom"
    first = run_script(MAKE_CERTS, str(config), "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    ca_before = tls.ca_cert_path(out).read_bytes()
    again = run_script(MAKE_CERTS, str(config), "--out", str(out), cwd=tmp_path)
    assert again.returncode == 1
    assert "--force" in again.stderr and str(tls.ca_key_path(out)) in again.stderr
    assert again.stdout == ""
    assert tls.ca_cert_path(out).read_bytes() == ca_before
    forced = run_script(MAKE_CERTS, str(config), "--out", str(out), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert tls.ca_cert_path(out).read_bytes() != ca_before
    assert all(mode(k) == 0o600 for k in tls.private_key_files(out, 2))
    tls.check_tls_dir(out, 2)


def test_make_certs_reports_a_bad_topology(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\naggregators: []\n")
    proc = run_script(MAKE_CERTS, str(bad), cwd=tmp_path)
    assert proc.returncode == 2
    assert "aggregators" in proc.stderr
    assert not (tmp_path / "tls").exists()


# --------------------------------------------------------------------------- tls helpers


def test_check_tls_dir_names_every_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tls.check_tls_dir(tmp_path, 2)
    err = info.value
    assert err.path == "tls.dir"
    assert "make_certs.py" in err.detail
    for path in tls.required_files(tmp_path, 2):
        assert str(path) in err.detail
    assert "ca.key" not in err.detail  # no party needs the CA key


def test_check_tls_dir_for_one_party_and_loose_keys(certs: CertDir, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    (copy / ".config").mkdir(parents=True)
    for path in tls.required_files(certs.tls_dir, M, index=1):
        target = copy / path.relative_to(certs.tls_dir)
        target.write_bytes(path.read_bytes())
        target.chmod(0o600)
    tls.check_tls_dir(copy, M, index=1)
    with pytest.raises(ConfigError) as info:
        tls.check_tls_dir(copy, M)  # all parties: 0's and 2's files are absent
    assert str(tls.party_cert_paths(copy, 0)[1]) in info.value.detail
    assert str(tls.party_cert_paths(copy, 1)[1]) not in info.value.detail
    tls.http_cert_paths(copy, 1)[1].chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        tls.check_tls_dir(copy, M, index=1)
    with pytest.raises(ValueError, match="index"):
        tls.check_tls_dir(copy, M, index=M)


def test_contexts_refuse_missing_or_mismatched_files(certs: CertDir, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="make_certs.py") as info:
        tls.server_context(tmp_path, 0)
    assert info.value.path == "tls.dir"
    with pytest.raises(ConfigError, match="ca.crt"):
        tls.client_context(tmp_path)
    crt, key = tls.http_cert_paths(tmp_path, 0)
    crt.write_bytes(tls.http_cert_paths(certs.tls_dir, 0)[0].read_bytes())
    key.write_bytes(tls.http_cert_paths(certs.tls_dir, 1)[1].read_bytes())  # another key
    with pytest.raises(ConfigError, match="cannot load certificate") as info:
        tls.server_context(tmp_path, 0)
    assert "PRIVATE KEY" not in str(info.value)
    tls.ca_cert_path(tmp_path).write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not a PEM CA certificate"):
        tls.client_context(tmp_path)


# --------------------------------------------------------------------------- make_secrets


def test_make_secrets_creates_keys_and_prints_verifiable_tokens(tmp_path: Path) -> None:
    config = write_topology(tmp_path, topology_doc(M, 1, name="sec3"))
    proc = run_script(
        MAKE_SECRETS, str(config), "--client", "alice", "--client", "bob", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "secrets" / "sec3"
    key_paths = [out / f"aggregator-{i}.key" for i in range(M)]
    for path in [*key_paths, out / "collector.token"]:
        assert mode(path) == 0o600, path
    keys = [load_secret(p) for p in key_paths]
    assert len(set(keys)) == M and all(len(k) == 32 for k in keys)
    for key in keys:
        assert key.hex() not in proc.stdout + proc.stderr

    lines = proc.stdout.splitlines()
    tokens = {}
    for line in lines:
        client_id, joined = line.split(" ")
        tokens[client_id] = joined.split(",")
    assert list(tokens) == ["alice", "bob"]
    for client_id, per_aggregator in tokens.items():
        assert len(per_aggregator) == M
        assert len(set(per_aggregator)) == M  # differ per aggregator
        for key, token in zip(keys, per_aggregator, strict=True):
            verify_client_token(key, client_id, token)
    assert set(tokens["alice"]).isdisjoint(tokens["bob"])  # and per client
    with pytest.raises(Forbidden):
        verify_client_token(keys[0], "alice", tokens["alice"][1])

    # A second run keeps the keys, so tokens already handed out stay valid.
    again = run_script(MAKE_SECRETS, str(config), "--client", "alice", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == lines[:1]
    assert "kept existing" in again.stderr


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


def test_load_secret(tmp_path: Path) -> None:
    secret = bytes(range(100, 132))
    path = tmp_path / "aggregator-0.key"
    for text in (secret.hex(), secret.hex() + "\n", secret.hex().upper() + "\r\n"):
        path.write_text(text, newline="")
        path.chmod(0o600)
        assert load_secret(path) == secret

    path.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        load_secret(path, yaml_path="auth.secrets_dir")
    assert info.value.path == "auth.secrets_dir"
    assert f"chmod 600 {path}" in info.value.detail
    assert secret.hex() not in str(info.value)

    for bad in (secret.hex()[:-1], secret.hex() + "0", "zz" * 32, secret.hex() + "\n\n", ""):
        path.write_text(bad, newline="")
        path.chmod(0o600)
        with pytest.raises(ConfigError, match="64 hex characters") as info:
            load_secret(path)
        assert str(path) in info.value.detail
        assert not bad or bad not in str(info.value)

    with pytest.raises(ConfigError, match="make_secrets.py"):
        load_secret(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(tmp_path)


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
