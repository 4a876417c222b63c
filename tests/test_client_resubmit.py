"""Resubmission across restarts: a client secret makes ``prepare`` deterministic.

docs/design.md, "Cryptographic core" (client secrets). Pure tests first (derivation layout
pinned against RFC 5869 written out with :mod:`hmac`, determinism and independence as
properties, unbiased coins as a statistical test with a stated false-failure rate, the
secret file), then real aggregator processes: a restarted client (a new Python process with
the same secret file) resubmits and every aggregator answers "identical retry".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_agg import Client, Topology, UploadRefused
from mpc_agg.client import load_client_secret
from mpc_agg.core import codec, sharing, xof
from mpc_agg.core.encoding import FixedPointEncoding
from mpc_agg.core.xof import ClientSecret, CoinStream, derivation_info
from mpc_agg.errors import ConfigError, UsageError

from .conftest import topology_doc

TOPOLOGY = Topology.from_dict(topology_doc(3, 1, name="resubmit", insecure=True))
SECRET = bytes(range(32))

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
client_secrets = st.binary(min_size=16, max_size=48)
vectors = st.lists(
    st.floats(-1000.0, 1000.0, allow_nan=False, allow_infinity=False), min_size=0, max_size=40
).map(lambda v: np.array(v, dtype=np.float64))


def bodies(secret: bytes, round_id: str, client_id: str, x: np.ndarray) -> list[bytes]:
    """The upload bodies of a brand-new client (no state shared with any other call)."""
    client = Client(TOPOLOGY, client_id, secret=secret)
    return [bytes(b) for b in client.prepare(round_id, x)]


def reconstruct(body_list: list[bytes], round_id: str, client_id: str, d: int) -> np.ndarray:
    shares = [
        codec.decode_share(b, aggregator=i, dim=d).expand(round_id, client_id)
        for i, b in enumerate(body_list)
    ]
    return sharing.unshard(shares)


# --------------------------------------------------------------------------- derivation


def rfc5869_okm(ikm: bytes, info: bytes, length: int = 16) -> bytes:
    """HKDF-SHA256 with no salt, written out from RFC 5869 (one output block suffices)."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()[:length]


def test_derivation_info_layout_is_pinned() -> None:
    fp = "ab" * 32
    coins = derivation_info(b"coins", fp, "r1", "alice")
    assert coins == (
        b"mpc_agg/client-derive/v1"
        + b"\x05\x00coins"
        + b"\x40\x00"
        + fp.encode()
        + b"\x02\x00r1"
        + b"\x05\x00alice"
    )
    digest = bytes(range(32))
    seed_info = derivation_info(b"seed", fp, "r1", "alice", b"\x02\x00\x01\x00\x00\x00" + digest)
    assert seed_info.startswith(b"mpc_agg/client-derive/v1\x04\x00seed\x40\x00")
    assert seed_info.endswith(b"\x02\x00\x01\x00\x00\x00" + digest)


def test_seeds_and_coins_are_hkdf_sha256_of_the_info() -> None:
    fp, digest = "cd" * 32, hashlib.sha256(b"x").digest()
    k = ClientSecret(SECRET)
    tail = b"\x02\x00\x01\x00\x00\x00" + digest  # aggregator 2, attempt 1
    assert k.seed(fp, "r", "c", 2, 1, digest) == rfc5869_okm(
        SECRET, derivation_info(b"seed", fp, "r", "c", tail)
    )
    key = rfc5869_okm(SECRET, derivation_info(b"coins", fp, "r", "c"))
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(80))
    words = np.frombuffer(stream, dtype="<u8")
    expected = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
    assert np.array_equal(k.coins(fp, "r", "c").random(10), expected)


def test_coin_stream_continues_across_calls_and_chunks() -> None:
    key = bytes(range(16))
    n = xof._CHUNK_BYTES // 8 + 1000  # one call spans two keystream chunks
    whole = CoinStream(key).random(n + 7)
    stream = CoinStream(key)
    parts = [stream.random(k) for k in (0, 3, n, 4)]
    assert np.array_equal(np.concatenate(parts), whole)
    assert whole.dtype == np.float64 and whole.min() >= 0.0 and whole.max() < 1.0
    with pytest.raises(ValueError, match="size"):
        stream.random(-1)


@pytest.mark.parametrize("bad", [b"", b"x" * 15, "0" * 64, 12345])
def test_short_or_non_bytes_secret_is_refused(bad: object) -> None:
    with pytest.raises(UsageError, match="secret"):
        Client(TOPOLOGY, "alice", secret=bad)  # type: ignore[arg-type]


def test_secret_excludes_injected_randomness() -> None:
    with pytest.raises(UsageError, match="not both"):
        Client(TOPOLOGY, "alice", secret=SECRET, rng=np.random.default_rng(1))
    with pytest.raises(UsageError, match="not both"):
        Client(TOPOLOGY, "alice", secret=SECRET, random_bytes=lambda n: bytes(n))


def test_secret_stays_out_of_reprs() -> None:
    secret = bytes.fromhex("5e" * 16 + "c7" * 16)
    client = Client(TOPOLOGY, "alice", secret=secret)
    k = ClientSecret(secret)
    coins = k.coins("00" * 32, "r", "alice")
    for text in (repr(client), str(client), repr(k), str(k), repr(coins)):
        assert secret.hex() not in text and "5e5e" not in text and repr(secret) not in text
        assert secret[:8].hex() not in text


# --------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(client_secrets, ids, ids, vectors)
def test_prepare_is_deterministic_and_shares_sum_to_the_encoding(
    secret: bytes, round_id: str, client_id: str, x: np.ndarray
) -> None:
    first = bodies(secret, round_id, client_id, x)
    assert bodies(secret, round_id, client_id, x) == first
    # The sum of the shares is exactly x encoded with the secret's coins for (round, client).
    coins = ClientSecret(secret).coins(Client(TOPOLOGY, client_id).fingerprint, round_id, client_id)
    encoded = TOPOLOGY.encoding.encode(x, coins)
    assert np.array_equal(reconstruct(first, round_id, client_id, len(x)), encoded)


def seed_bodies(body_list: list[bytes], client_id: str) -> list[bytes]:
    full = sharing.full_share_index(client_id, TOPOLOGY.m)
    return [b for i, b in enumerate(body_list) if i != full]


@settings(max_examples=40, deadline=None)
@given(client_secrets, client_secrets, ids, ids, ids, vectors)
def test_seeds_differ_across_rounds_clients_secrets_and_vectors(
    secret: bytes, other_secret: bytes, round_id: str, other_id: str, client_id: str, x
) -> None:
    base = seed_bodies(bodies(secret, round_id, client_id, x), client_id)
    variants = []
    if other_id != round_id:
        variants.append(seed_bodies(bodies(secret, other_id, client_id, x), client_id))
    if other_id != client_id:
        variants.append(seed_bodies(bodies(secret, round_id, other_id, x), other_id))
    if other_secret != secret:
        variants.append(seed_bodies(bodies(other_secret, round_id, client_id, x), client_id))
    # A different vector for the same round gets unrelated seeds: with the same ones, the
    # full-share aggregator would learn the difference of the two vectors from the refused
    # second upload.
    if len(x):
        y = x.copy()
        y[0] = 500.0 if x[0] < 0 else -500.0  # encodes differently, whatever the coins
        variants.append(seed_bodies(bodies(secret, round_id, client_id, y), client_id))
    seeds = {b for v in variants for b in v} | set(base)
    assert len(seeds) == len(base) * (1 + len(variants))  # no seed repeats anywhere


def test_another_topology_gets_other_seeds() -> None:
    other = Topology.from_dict(topology_doc(3, 1, name="resubmit-2", insecure=True))
    x = np.arange(5.0)
    a = Client(TOPOLOGY, "alice", secret=SECRET).prepare("r", x)
    b = Client(other, "alice", secret=SECRET).prepare("r", x)
    assert not {bytes(v) for v in a} & {bytes(v) for v in b}


def test_seed_after_a_rejected_stream_is_the_next_attempt(monkeypatch) -> None:
    """A rejected stream (forced here) moves on to attempt 1 of the same aggregator, so a
    restarted client that meets the same rejection derives the same replacement."""
    calls: list[tuple[int, int]] = []
    k = ClientSecret(SECRET)
    digest = hashlib.sha256(b"v").digest()

    def seed_for(j: int, attempt: int) -> bytes:
        calls.append((j, attempt))
        return k.seed("ef" * 32, "r", "c", j, attempt, digest)

    real_next = xof.BlockStream.next_block
    n = {"blocks": 0}

    def next_block(self, size):  # the first stream is "rejected" at its first block
        n["blocks"] += 1
        return None if n["blocks"] == 1 else real_next(self, size)

    x = np.arange(10, dtype=np.uint64)
    monkeypatch.setattr(xof.BlockStream, "next_block", next_block)
    shares = sharing.shard(x, "r", "c", 3, full_index=0, seed_for=seed_for)
    monkeypatch.undo()
    assert calls == [(1, 0), (1, 1), (2, 0)]
    assert shares[1].seed == k.seed("ef" * 32, "r", "c", 1, 1, digest)
    assert np.array_equal(sharing.unshard([s.expand("r", "c") for s in shares]), x)


def test_without_a_secret_each_client_draws_fresh_randomness() -> None:
    x = np.full(8, 0.5)
    a = Client(TOPOLOGY, "alice").prepare("r", x)
    b = Client(TOPOLOGY, "alice").prepare("r", x)
    assert all(bytes(u) != bytes(v) for u, v in zip(a, b, strict=True))


# --------------------------------------------------------------------------- unbiased coins

ALPHA = 1e-9
"""False-failure rate of each statistical check below, for each key it is run with (the
coins are a deterministic function of the key, so the randomness is the key's: a pseudorandom
stream fails with this probability, an ideal one too, by Hoeffding's inequality)."""


def hoeffding_bound(n: int, alpha: float = ALPHA) -> float:
    """t with P(|sum of n independent errors of range 1 minus its mean| >= t) <= alpha."""
    return math.sqrt(n * math.log(2 / alpha) / 2)


@pytest.mark.parametrize("key_index", range(4))
def test_coin_rounding_is_unbiased(key_index: int) -> None:
    """With frac_bits = 0, x_i rounds up to ceil(x_i) with probability frac(x_i): the errors
    v_i - x_i are independent, of mean 0 (up to 2**-53) and range 1, so their sum stays
    within the Hoeffding bound (false failure <= 1e-9 per key, 4e-9 for the test)."""
    encoding = FixedPointEncoding(frac_bits=0, coord_clip=100.0)
    n = 200_000
    x = np.random.default_rng(key_index).uniform(-50.0, 50.0, size=n)
    coins = ClientSecret(bytes([key_index]) * 32).coins("00" * 32, f"r{key_index}", "c")
    v = encoding.decode(encoding.encode(x, coins))
    errors = v - x
    assert np.all((errors > -1.0) & (errors < 1.0))
    assert abs(errors.sum()) < hoeffding_bound(n)
    # and the coin of one fixed fraction: rounds up with probability 0.3
    ups = encoding.decode(encoding.encode(np.full(n, 0.3), coins)).sum()
    assert abs(ups - 0.3 * n) < hoeffding_bound(n)


# --------------------------------------------------------------------------- secret file


def test_secret_file_is_made_once_private_and_reread(tmp_path: Path) -> None:
    path = tmp_path / "client.secret"
    secret = load_client_secret(path)
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == secret.hex() + "\n"
    assert load_client_secret(path) == secret
    assert load_client_secret(path, create=False) == secret


def test_missing_secret_file_without_create(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_client_secret(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ConfigError, match="cannot create"):
        load_client_secret(tmp_path / "no-dir" / "secret")


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "client.secret"
    secret = load_client_secret(path)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600") as refused:
        load_client_secret(path)
    assert secret.hex() not in str(refused.value)


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 15, "\xff"])
def test_malformed_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "client.secret"
    path.write_bytes(content.encode("latin-1"))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16 bytes as hex"):
        load_client_secret(path)


# --------------------------------------------------------------------------- processes

RESTARTED_CLIENT = """
import sys
import numpy as np
from mpc_agg import Client, Topology, UploadRefused
from mpc_agg.client import load_client_secret

config, secret_file, round_id, vector_file, tokens = sys.argv[1:]
secret = load_client_secret(secret_file, create=False)
client = Client(Topology.load(config), "alice", tokens, secret=secret)
try:
    receipt = client.submit(round_id, np.load(vector_file))
except UploadRefused as exc:
    print("refused", exc.status, exc.code)
else:
    print("accepted", ",".join(map(str, receipt.retries)))
"""


def run_restarted_client(fed, secret_file: Path, round_id: str, x: np.ndarray, tmp: Path) -> str:
    """Submit ``x`` as "alice" from a new Python process holding only the secret file."""
    vector_file = tmp / f"x-{hashlib.sha256(x.tobytes()).hexdigest()[:8]}.npy"
    np.save(vector_file, x)
    tokens = ",".join(fed.deployment.client_tokens("alice"))
    out = subprocess.run(
        [sys.executable, "-c", RESTARTED_CLIENT, str(fed.config), str(secret_file), round_id]
        + [str(vector_file), tokens],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.processes
def test_restarted_client_resubmits_and_is_counted_once(federation3, round_id, tmp_path):
    d = 1000
    collector = federation3.collector()
    collector.open_round(round_id, d)
    rng = np.random.default_rng(14)
    x = rng.normal(0.0, 10.0, size=d)  # fractional: the coins decide the encoding
    z = rng.integers(-1000, 1001, size=d).astype(np.float64)
    secret_file = tmp_path / "alice.secret"
    alice = federation3.client("alice", secret=load_client_secret(secret_file))
    first = alice.submit(round_id, x)
    assert first.retries == ()
    # "alice crashes": a new process, with nothing but the secret file, sends the same bytes.
    assert run_restarted_client(federation3, secret_file, round_id, x, tmp_path) == (
        "accepted 0,1,2"
    )
    # A different vector for the same round is still a conflict.
    y = x + 0.5
    assert run_restarted_client(federation3, secret_file, round_id, y, tmp_path) == (
        "refused 409 conflicting_share"
    )
    with pytest.raises(UploadRefused) as refused:
        federation3.client("alice", secret=load_client_secret(secret_file)).submit(round_id, y)
    assert (refused.value.status, refused.value.code) == (409, "conflicting_share")
    federation3.client("bob").submit(round_id, z)
    assert [s["accepted"] for s in collector.status(round_id)] == [2, 2, 2]
    result = collector.aggregate(round_id, timeout=60)
    assert result.num_clients == 2
    # Exactly alice's encoding (her secret's coins for this round) plus bob's integers.
    coins = ClientSecret(load_client_secret(secret_file)).coins(
        alice.fingerprint, round_id, "alice"
    )
    encoding = federation3.topology.encoding
    expected = encoding.decode(encoding.encode(x, coins)) + z
    np.testing.assert_array_equal(result.total, expected)
