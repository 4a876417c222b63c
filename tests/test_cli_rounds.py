"""``mpc-agg open / submit / collect / status / rounds / abort``.

Vector files are read in process (``mpc_agg.cli.main`` with capsys, and
:mod:`mpc_agg.cli.vectors` directly): every format, and every bad input refused with exit
status 2 and a message naming the file (and the line for text). One process test runs the
whole flow through real ``python -m mpc_agg`` subprocesses against one local federation.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mpc_agg.cli import main
from mpc_agg.cli.vectors import parse_text, read_vector, write_vector
from mpc_agg.errors import EncodingError, UsageError
from mpc_agg.launcher import LocalFederation

from .conftest import ROOT, free_ports, topology_doc, write_topology

# -- vector files, in process ---------------------------------------------------------------


@pytest.fixture
def topo(tmp_path: Path) -> Path:
    """An insecure loopback topology with nothing listening: a submit that gets past
    reading its vector would fail to connect, so these tests never reach the network."""
    return write_topology(tmp_path, topology_doc(2, 0, name="novec", insecure=True))


def submit(topo: Path, vector: str, *extra: str) -> int:
    secret = topo.parent / "alice.secret"
    return main(
        ["submit", "-t", str(topo), "--round", "r1", "--client", "alice", "--secret", str(secret)]
        + list(extra)
        + [vector]
    )


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_npy_csv_and_text_files_are_read(tmp_path):
    x = np.array([1.5, -2.0, 3.25e-3, 1000.0])
    assert np.array_equal(read_vector(write(tmp_path, "v.npy", npy_bytes(x))), x)
    # .npy is recognised by its magic, whatever the file is called
    assert np.array_equal(read_vector(write(tmp_path, "v.bin", npy_bytes(x))), x)
    ints = np.array([1, -2, 3], dtype=np.int32)
    assert read_vector(write(tmp_path, "i.npy", npy_bytes(ints))).tolist() == [1.0, -2.0, 3.0]
    assert read_vector(write(tmp_path, "row.csv", "1.5,-2,0.00325,1000\n")).tolist() == x.tolist()
    assert read_vector(write(tmp_path, "col.csv", "1.5\n-2\n\n0.00325\n1e3\n")).tolist() == (
        x.tolist()
    )
    text = "# weights\n1.5, -2\n  0.00325\t1000,\n"
    assert read_vector(write(tmp_path, "v.txt", text)).tolist() == x.tolist()
    assert read_vector(write(tmp_path, "bom.csv", "\ufeff1,2\n")).tolist() == [1.0, 2.0]


def test_standard_input_takes_npy_or_text():
    x = np.array([0.5, 0.25])
    assert read_vector("-", stdin=io.BytesIO(npy_bytes(x))).tolist() == [0.5, 0.25]
    assert read_vector("-", stdin=io.BytesIO(b"0.5 0.25\n")).tolist() == [0.5, 0.25]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("nan.txt", "1\n2\nnan\n", "line 3: nan (value 3 of 3) is not a finite number"),
        ("inf.csv", "1,2,-inf\n", "line 1: -inf (value 3 of 3) is not a finite number"),
        ("word.txt", "1 2\n# ok\n3 three\n", "line 3: 'three' is not a number"),
        ("header.csv", "weight\n1\n2\n", "line 1: 'weight' is not a number"),
        ("empty.txt", "# nothing\n\n", "holds no numbers"),
        ("empty.csv", "", "holds no numbers"),
        ("table.csv", "1,2\n3,4\n", "is a table (2 lines, line 1 has 2 values)"),
        ("gap.csv", "1,,2\n", "line 1: an empty value between commas"),
        ("gap.txt", "1\n2,,3\n", "line 2: an empty value between commas"),
        ("spaced.csv", "1 2,3\n", "line 1: '1 2' is not one number"),
        ("fake.npy", "1 2 3\n", "is named .npy but is not a .npy file"),
        ("binary.dat", b"\x00\xff\xfe\x01", "neither a .npy file nor UTF-8 text"),
    ],
)
def test_bad_text_is_refused_naming_file_and_line(tmp_path, topo, capsys, name, content, expected):
    path = write(tmp_path, name, content)
    assert submit(topo, path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and repr(path) in err
    assert "Traceback" not in err
    assert not (topo.parent / "alice.secret").exists()  # nothing made for a bad vector


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[1.0, 2.0], [3.0, 4.0]]), "shape (2, 2); a vector is 1-D"),
        (np.array(3.0), "shape (); a vector is 1-D"),
        (np.array([1.0, np.inf]), "index 1: inf (value 2 of 2) is not a finite number"),
        (np.array([], dtype=np.float64), "holds no numbers"),
        (np.array([1 + 2j]), "complex"),
        (np.array(["a", "b"]), "<U1 values, not numbers"),
        (np.array([{"a": 1}], dtype=object), "not a valid .npy file"),
        (np.array([2**60], dtype=np.int64), "beyond 2**53"),
    ],
)
def test_bad_npy_is_refused(tmp_path, topo, capsys, array, expected):
    path = write(tmp_path, "v.npy", npy_bytes(array))
    assert submit(topo, path) == 2
    err = capsys.readouterr().err
    assert expected in err and repr(path) in err


def test_bad_standard_input_is_named(topo, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"1\n2\nNaN\n")))
    assert submit(topo, "-") == 2
    assert "standard input, line 3: nan" in capsys.readouterr().err


def test_missing_vector_file_is_a_usage_error(tmp_path, topo, capsys):
    assert submit(topo, str(tmp_path / "nope.csv")) == 2
    assert "cannot read vector file" in capsys.readouterr().err


def test_parse_errors_are_typed():
    with pytest.raises(EncodingError, match="'x', line 2"):
        parse_text("1\n2 3x\n", "'x'", csv=False)
    with pytest.raises(UsageError):
        read_vector("/nonexistent/v.txt")


def test_submit_and_round_usage_errors(topo, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "-t", str(topo), "--round", "bad id", "--client", "a", "v.txt"])
    assert exc.value.code == 2
    assert "round id 'bad id' is invalid" in capsys.readouterr().err
    # Without grants (insecure topology) the client must be named.
    assert main(["submit", "-t", str(topo), "--round", "r1", "v.txt"]) == 2
    assert "--client" in capsys.readouterr().err


def test_collect_refuses_output_names_before_touching_the_round(tmp_path, topo, capsys):
    # Nothing listens on the topology's ports: these fail before any request.
    base = ["collect", "-t", str(topo), "--round", "r1"]
    assert main([*base, "--output", str(tmp_path / "total.txt")]) == 2
    assert ".npy or .csv" in capsys.readouterr().err
    assert main([*base, "--result", str(tmp_path / "result.json")]) == 2
    assert ".npz" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "missing" / "t.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "old.csv").write_text("1\n")
    assert main([*base, "--output", str(tmp_path / "old.csv")]) == 2
    assert "--force" in capsys.readouterr().err


def test_totals_round_trip(tmp_path, capsys):
    x = np.array([0.1, -1 / 3, 1e-12, 123456.789])
    for name in ("t.npy", "t.csv"):
        write_vector(str(tmp_path / name), x)
        assert read_vector(str(tmp_path / name)).tolist() == x.tolist()  # exact
    write_vector("-", x)
    assert [float(v) for v in capsys.readouterr().out.split()] == x.tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


# -- the whole flow through real processes --------------------------------------------------


def cli(*args: str, stdin: bytes | None = None, cwd: Path | None = None):
    """``python -m mpc_agg ARGS``: (exit status, stdout, stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "mpc_agg", *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "MPC_AGG_TOPOLOGY": ""},
    )
    return out.returncode, out.stdout.decode(), out.stderr.decode()


def ok(*args: str, **kwargs) -> str:
    rc, out, err = cli(*args, **kwargs)
    assert rc == 0, f"mpc-agg {' '.join(args)} -> {rc}\n{out}\n{err}"
    return out + err


def local3(tmp_path: Path) -> Path:
    """configs/local-3.yaml on free ports, its data under ``tmp_path``."""
    doc = yaml.safe_load((ROOT / "configs" / "local-3.yaml").read_text())
    ports = free_ports(6)
    for i, entry in enumerate(doc["aggregators"]):
        entry["mpc_port"], entry["http_port"] = ports[2 * i], ports[2 * i + 1]
    doc.update(data_dir=str(tmp_path / "data"), fsync=False)
    path = tmp_path / "local-3.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.processes
def test_open_submit_collect_verify_abort_through_the_command(tmp_path):
    config = local3(tmp_path)
    with open(os.devnull, "w") as sink, LocalFederation(config, cwd=tmp_path, output=sink) as fed:
        t = str(fed.config_path)
        clients, collector = tmp_path / "clients", tmp_path / "collector"
        for party_dir in fed.deployment.party_dirs:  # in process: the same code, less start-up
            token = ["token", "--party-dir", str(party_dir)]
            assert main([*token, "--client", "alice", "bob", "carol", "-o", str(clients)]) == 0
            assert main([*token, "--collector", "-o", str(collector)]) == 0
        col = ["-t", t, "--tokens", str(collector)]

        out = ok("open", *col, "--round", "r1", "--dim", "4")
        assert "open at all 3 aggregators" in out and "d = 4, min clients 2" in out

        alice = np.array([1.0, -2.5, 0.125, 1e-3])
        bob = np.array([0.5, 0.5, -0.25, 7.0])
        carol = np.array([-3.0, 2.0, 1e-6, 0.0])
        (tmp_path / "alice.txt").write_text("# alice\n1.0, -2.5\n0.125 1e-3\n")
        (tmp_path / "bob.csv").write_text("0.5\n0.5\n-0.25\n7\n")

        alice_txt, bob_csv = str(tmp_path / "alice.txt"), str(tmp_path / "bob.csv")
        sub, by_dir = ["submit", "-t", t, "-r", "r1"], ["--tokens", str(clients)]

        # alice: named among all clients' grants in one directory; her secret is made there.
        out = ok(*sub, alice_txt, "--client", "alice", *by_dir)
        assert "made a new client secret" in out and (clients / "alice.secret").exists()
        assert oct((clients / "alice.secret").stat().st_mode & 0o777) == "0o600"
        assert "client alice, d = 4: accepted" in out and "retries 0" in out
        # bob: grant files named one by one, the client taken from them, --secret given.
        bob_grants = [str(clients / f"bob-{i}.token") for i in range(3)]
        secret = str(tmp_path / "bob.secret")
        out = ok(*sub, "--secret", secret, bob_csv, *_each("--tokens", bob_grants))
        assert "client bob, d = 4: accepted" in out
        # carol: a .npy on standard input.
        buf = io.BytesIO()
        np.save(buf, carol)
        out = ok(*sub, "--client", "carol", "-", *by_dir, stdin=buf.getvalue())
        assert "client carol, d = 4: accepted" in out

        # The same submit again (a restart after a crash): the same bytes, answered 200.
        out = ok(*sub, alice_txt, "--client", "alice", *by_dir)
        assert "already held (retry)" in out and "retries 3" in out
        assert "made a new client secret" not in out
        # Another vector from alice for the same round: refused, exit 4.
        (tmp_path / "alice2.txt").write_text("9 9 9 9\n")
        rc, _, err = cli(*sub, "--client", "alice", str(tmp_path / "alice2.txt"), *by_dir)
        assert rc == 4 and "conflicting_share" in err and "different vector" in err
        # A directory of several clients' grants and no --client: which one is ambiguous.
        rc, _, err = cli(*sub, alice_txt, *by_dir)
        assert rc == 2 and "grants of 3 clients (alice, bob, carol)" in err
        # VECTOR after --tokens (one path per --tokens): the same retry.
        out = ok(*sub, *by_dir, alice_txt, "--client", "alice")
        assert "already held (retry)" in out
        # A grant missing: exit 2, naming the aggregator without one.
        rc, _, err = cli(*sub, bob_csv, *_each("--tokens", bob_grants[:2]))
        assert rc == 2 and "aggregator(s) 2" in err and "bob" in err
        # The wrong dimension: the aggregators refuse it, exit 4.
        (tmp_path / "short.txt").write_text("1 2 3\n")
        rc, _, err = cli(*sub, "--client", "carol", str(tmp_path / "short.txt"), *by_dir)
        assert rc == 4 and "wrong_dimension" in err

        out = ok("status", *col, "--round", "r1", "--json")
        answers = json.loads(out[: out.rindex("]") + 1])
        assert [(a["aggregator"], a["state"], a["accepted"]) for a in answers] == [
            (0, "open", 3),
            (1, "open", 3),
            (2, "open", 3),
        ]
        out = ok("status", *col, "--round", "r1")
        assert "agg  state  accepted  dim" in out
        out = ok("rounds", "-t", t, "--tokens", str(collector), "--json")
        assert json.loads(out)[0]["rounds"][0]["round"] == "r1"
        out = ok("rounds", "-t", t, "--tokens", str(collector))
        assert "r1     open   3" in out

        # A bad output name is refused before the round is closed.
        rc, _, err = cli("collect", *col, "-r", "r1", "--output", str(tmp_path / "t.txt"))
        assert rc == 2 and ".npy or .csv" in err
        total_csv, result = tmp_path / "total.csv", tmp_path / "result.npz"
        wait = ["--wait-clients", "3", "--wait-timeout", "30"]
        out = ok("collect", *col, "-r", "r1", *wait, "-o", str(total_csv), "--result", str(result))
        assert "clients counted     : 3" in out and "dropped (partial)   : 0" in out
        assert "verified: all 3 aggregators signed it" in out
        assert "clients [" in out  # the wait's progress line
        total = np.loadtxt(total_csv)
        assert np.allclose(total, alice + bob + carol, rtol=0, atol=3 * 2.0**-24)

        out = ok("verify", "-t", t, str(result))
        assert "ok:" in out and "round r1, 3 clients" in out
        with np.load(result) as data:
            fields = {k: data[k] for k in data.files}
        fields["field_total"] = fields["field_total"].copy()
        fields["field_total"][0] += 1
        tampered = tmp_path / "tampered.npz"
        np.savez(tampered, **fields)
        rc, _, err = cli("verify", "-t", t, str(tampered))
        assert rc == 1 and "MISMATCH" in err

        # abort: an open round ends everywhere with nothing revealed.
        ok("open", *col, "--round", "r2", "--dim", "4")
        ok("submit", "-t", t, "-r", "r2", "--client", "alice", alice_txt, *by_dir)
        out = ok("abort", *col, "--round", "r2")
        assert "aborted at every aggregator; nothing revealed" in out
        out = ok("status", *col, "--round", "r2")
        assert "cancelled" in out
        rc, _, err = cli("collect", *col, "-r", "r2", "--output", str(tmp_path / "t2.npy"))
        assert rc == 1 and "(cancelled)" in err and "nothing was revealed" in err
        assert not (tmp_path / "t2.npy").exists()
        # A round that never reaches min_clients fails with its code (too_few_clients).
        ok("open", *col, "--round", "r3", "--dim", "4")
        rc, _, err = cli("collect", *col, "-r", "r3")
        assert rc == 1 and "(too_few_clients)" in err


def _each(option: str, values: list[str]) -> list[str]:
    """``option`` before every value (a repeatable option)."""
    return [x for v in values for x in (option, v)]
