"""The packaging in deploy/ runs commands the real parsers accept, the same ones the
namespace test runs (README, "Deploying across organisations"), so it cannot rot.

Every ``mpc-agg`` command line of ``deploy/Dockerfile`` (ENTRYPOINT + CMD),
``deploy/compose.yaml`` (each service's command, with and without the first-start flag) and
``deploy/mpc-agg-party@.service`` (ExecStart, with ``%i`` and its environment expanded) is
parsed by ``mpc_agg.cli.build_parser()`` or, for ``party``, the party's own parser; the
party command must be :func:`scripts.netns_lab.party_command`.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mpc_agg import party
from mpc_agg.cli import build_parser
from scripts.netns_lab import party_command

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
FIRST_START = "--new-data-dir"


def parse_mpc_agg(argv: list[str]) -> None:
    """Parse ``mpc-agg argv`` as the command would (SystemExit on anything it refuses)."""
    assert argv, "an empty mpc-agg command"
    if argv[0] == "party":
        party.parse_args(argv[1:])
    else:
        build_parser().parse_args(argv)


def _instruction(dockerfile: str, name: str) -> list[str]:
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", dockerfile, flags=re.MULTILINE)
    assert len(found) == 1, f"one exec-form {name} expected"
    argv: list[str] = json.loads(found[0])
    return argv


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1]) or (m[2] or ""), text)


def test_dockerfile_runs_the_party_command() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, flags=re.MULTILINE)
    assert _instruction(text, "ENTRYPOINT") == ["mpc-agg"]
    cmd = _instruction(text, "CMD")
    parse_mpc_agg(cmd)
    assert cmd == party_command("/party", first_start=False)
    assert re.search(r"^USER (?!root)\w+", text, flags=re.MULTILINE)  # not root
    assert re.search(r'^VOLUME \["/party"\]', text, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 11365 8701$", text, flags=re.MULTILINE)


@pytest.mark.parametrize("first_start", [False, True])
def test_compose_parties_run_the_party_command(first_start: bool) -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {"MPC_AGG_FIRST_START": FIRST_START} if first_start else {}
    parties = {name: s for name, s in doc["services"].items() if name.startswith("party")}
    assert sorted(parties) == ["party0", "party1", "party2"]
    volumes = set()
    for name, service in parties.items():
        assert "entrypoint" not in service  # the image's: mpc-agg
        argv = shlex.split(_interpolate(service["command"], env))
        parse_mpc_agg(argv)
        assert argv == party_command("/party", first_start=first_start)
        (mount,) = service["volumes"]
        volume, target = mount.split(":")
        assert target == "/party" and volume in doc["volumes"]
        volumes.add(volume)
        assert service["hostname"] == name  # the name it advertises (keygen --host)
    assert len(volumes) == 3  # a party directory each
    assert doc["services"]["tools"]["command"] == "--help"  # `run --rm tools CMD ...`


def _comment_commands(text: str, marker: str) -> list[list[str]]:
    """The example ``marker ...`` command lines in ``text``'s comments (continuations
    joined), as mpc-agg argv."""
    joined = re.sub(r"\\\n#\s*", " ", text)
    out = []
    for line in joined.splitlines():
        if marker in line and line.lstrip().startswith("#"):
            tail = line.split(marker, 1)[1].split(";")[0].split("#")[0]
            out.append(shlex.split(tail))
    return out


def test_compose_documented_commands_parse() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    commands = _comment_commands(text.replace("$i", "0"), "docker compose run --rm --no-deps ")
    assert len(commands) == 4  # keygen, assemble, verify, token
    for argv in commands:
        parse_mpc_agg(argv[1:])  # argv[0] is the service


@pytest.mark.parametrize("flags", ["", FIRST_START])
def test_systemd_unit_runs_the_party_command(flags: str) -> None:
    text = (DEPLOY / "mpc-agg-party@.service").read_text()
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    (exec_start,) = settings["ExecStart"]
    line = exec_start.replace("%i", "acme").replace("$MPC_AGG_PARTY_FLAGS", flags)
    argv = shlex.split(line)
    assert Path(argv[0]).name == "mpc-agg"
    parse_mpc_agg(argv[1:])
    expected = party_command("/etc/mpc-agg/acme", first_start=False)
    assert argv[1 : 1 + len(expected)] == expected
    assert argv[1 + len(expected) :] == ["--data-dir", "/var/lib/mpc-agg/acme", *flags.split()]
    hardening: dict[str, list[str]] = {
        "User": ["mpc-agg"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "PrivateTmp": ["yes"],
        "StateDirectory": ["mpc-agg/%i"],
        "ReadWritePaths": ["/var/lib/mpc-agg/%i"],
        "CapabilityBoundingSet": [""],
    }
    for directive, wanted in hardening.items():
        assert settings.get(directive) == wanted, directive
    commands = _comment_commands(text, "/opt/mpc-agg/bin/mpc-agg ")
    assert len(commands) == 2  # keygen, verify
    for documented in commands:
        parse_mpc_agg(documented)
