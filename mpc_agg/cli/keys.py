"""``mpc-agg keygen``, ``assemble``, ``token`` and ``verify``: identities across organisations.

README, "Deploying across organisations". ``keygen`` runs on each party's own machine and
writes that party's private keys (mode 0600) and its public card; ``assemble`` builds the
shared topology from a template and the cards (public material only); ``token`` issues
this aggregator's token grants to clients and the collector; ``verify`` checks that a
topology holds a party's card unchanged, or re-checks a saved result's signed statements.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from mpc_agg.cli import common
from mpc_agg.errors import ConfigError, MpcAggError, UsageError

PARTY_SETTINGS = "party.yaml"
"""The party directory's local settings (not fingerprinted): ``data_dir`` and ``bind``."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keygen``, ``assemble``, ``token`` and ``verify``."""
    p = common.parser_for(
        sub,
        "keygen",
        "make this party's keys and its public card (run on the party's own machine)",
        "Create a party directory: the party-link, HTTPS and signing keys, the token key and "
        "the collector token (all private, mode 0600), their public certificates and the "
        "party's card.yaml (address and public keys: send only this file to whoever "
        "assembles the topology). Never overwrites a key.",
        _keygen,
    )
    p.add_argument("--party-dir", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--index", required=True, type=int, help="this aggregator's index, 0..m-1")
    p.add_argument(
        "--host",
        required=True,
        help="the address others reach this party at (DNS name, IPv4 or IPv6 literal); "
        "its HTTPS certificate names it",
    )
    p.add_argument("--mpc-port", required=True, type=int, help="port of the party links (MPyC)")
    p.add_argument("--http-port", required=True, type=int, help="port of the HTTPS API")
    p.add_argument(
        "--bind",
        default=None,
        help="address to listen on when it differs from --host (containers, NAT): "
        "written to party.yaml",
    )
    p.add_argument(
        "--data-dir",
        default="data",
        help="this party's data directory (journals, privacy ledger), relative to the party "
        "directory (default: data); written to party.yaml",
    )

    p = common.parser_for(
        sub,
        "assemble",
        "build the shared topology from a template and every party's card",
        "Write the topology: the template's settings (name, threshold, rounds, encoding, dp, "
        "deadlines) with aggregators[i] = party i's card. Public material only. Prints the "
        "fingerprint every party compares before starting.",
        _assemble,
    )
    p.add_argument("--template", required=True, metavar="FILE", help="topology template YAML")
    p.add_argument("cards", nargs="+", metavar="CARD", help="card.yaml files (any order)")
    p.add_argument("--output", "-o", required=True, metavar="FILE", help="topology to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")

    p = common.parser_for(
        sub,
        "token",
        "issue this aggregator's token grant to a client or to the collector",
        "Write this aggregator's token grant for each client named (or for the collector), "
        "one file each (<client>-<index>.token, mode 0600). A client needs one grant from "
        "every aggregator; give the files to it over a channel you trust. Issuing again "
        "gives the same token.",
        _token,
    )
    p.add_argument("--party-dir", required=True, metavar="DIR", help="this aggregator's party dir")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", nargs="+", metavar="ID", help="client id(s) to issue for")
    who.add_argument("--clients-file", metavar="FILE", help="a file of client ids, one per line")
    who.add_argument("--collector", action="store_true", help="issue the collector's grant")
    p.add_argument(
        "--output",
        "-o",
        default=".",
        metavar="DIR",
        help="directory for the grant files (default: the current directory); '-' prints "
        "one grant to standard output",
    )
    p.add_argument("--force", action="store_true", help="replace existing grant files")

    p = common.parser_for(
        sub,
        "verify",
        "check a topology holds a party's card, or re-check a saved result",
        "With --card or --party-dir: check that the topology's entry for that party is its "
        "card unchanged (run it on the assembled topology before starting). With RESULT "
        "files (saved by `mpc-agg collect --result`): check every aggregator's signed "
        "statement vouches for the total under this topology.",
        _verify,
    )
    common.add_topology(p)
    p.add_argument("--card", metavar="FILE", help="a party's card.yaml")
    p.add_argument("--party-dir", metavar="DIR", help="a party directory (its card.yaml)")
    p.add_argument("results", nargs="*", metavar="RESULT", help="saved result files (.npz)")


def _keygen(args: argparse.Namespace) -> int:
    from mpc_agg.config.schema import AggregatorAddress, check_host
    from mpc_agg.identity import CARD, generate_party_dir

    # The address checks of the topology and of party.yaml, before any key is made.
    AggregatorAddress(
        index=args.index, host=args.host, mpc_port=args.mpc_port, http_port=args.http_port
    )
    local: dict[str, str] = {"data_dir": _checked_data_dir(args.data_dir)}
    if args.bind is not None:
        local["bind"] = check_host(args.bind, "--bind")
    directory = Path(args.party_dir)
    settings = directory / PARTY_SETTINGS
    if os.path.lexists(settings):
        raise UsageError(f"{str(settings)!r} already exists; keys are never overwritten")
    card = generate_party_dir(directory, args.index, args.host, args.mpc_port, args.http_port)
    text = (
        "# This party's local settings (not part of the shared topology); paths relative "
        "to this directory.\n" + yaml.safe_dump(local, sort_keys=False)
    )
    # Exclusively, never through a link planted in the directory meanwhile.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(settings, flags, 0o644), "w") as f:
        f.write(text)
    print(f"party {card.index}: keys in {str(common.resolve(directory))} (private, mode 0600)")
    print(f"card: {str(common.resolve(directory / CARD))}  <- send this file, and only this")
    return common.EXIT_OK


def _checked_data_dir(value: str) -> str:
    """``--data-dir`` as party.yaml will hold it: a non-empty path without NUL."""
    if not value or "\x00" in value:
        raise UsageError(f"--data-dir: not a usable path: {value!r}")
    return value


def _assemble(args: argparse.Namespace) -> int:
    from mpc_agg.assembly import assemble
    from mpc_agg.identity import read_card

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UsageError(f"{str(out)!r} already exists; pass --force to replace it")
    assembled = assemble(args.template, [read_card(c) for c in args.cards])
    # A new file of our own beside the output (never an existing one, never a link),
    # renamed over it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(assembled.text)
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"topology {assembled.topology.name}: {assembled.topology.m} aggregators -> {out}")
    print(f"fingerprint {assembled.fingerprint}")
    return common.EXIT_OK


def _client_ids(args: argparse.Namespace) -> list[str] | None:
    if args.collector:
        return None
    if args.client:
        return list(args.client)
    try:
        lines = Path(args.clients_file).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {args.clients_file!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{args.clients_file!r} is not UTF-8 text") from None
    ids = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not ids:
        raise UsageError(f"{args.clients_file!r} names no client")
    return ids


def _token(args: argparse.Namespace) -> int:
    from mpc_agg.credentials import issue_client_grant, issue_collector_grant

    ids = _client_ids(args)
    grants = (
        [issue_collector_grant(args.party_dir)]
        if ids is None
        else [issue_client_grant(args.party_dir, c) for c in ids]
    )
    if args.output == "-":
        if len(grants) != 1:
            raise UsageError("--output - prints one grant; name one client")
        sys.stdout.write(grants[0].to_yaml())
        return common.EXIT_OK
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for grant in grants:
        grant.save(out / grant.default_name, overwrite=args.force)
    names = ", ".join(g.default_name for g in grants[:3]) + (" ..." if len(grants) > 3 else "")
    print(f"aggregator {grants[0].aggregator}: {len(grants)} grant(s) in {out}: {names}")
    return common.EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from mpc_agg.assembly import card_differences
    from mpc_agg.collector import verify_saved
    from mpc_agg.config.fingerprint import fingerprint
    from mpc_agg.identity import read_card

    if args.card and args.party_dir:
        raise UsageError("give --card or --party-dir, not both")
    card_path = args.card or args.party_dir
    if card_path is None and not args.results:
        raise UsageError("nothing to verify: give --card/--party-dir, or RESULT files")
    topology = common.load_topology(args)
    status = common.EXIT_OK
    if card_path is not None:
        card = read_card(card_path)
        differ = card_differences(topology, card)
        if differ:
            print(
                f"MISMATCH: {args.topology} does not hold the card of aggregator {card.index} "
                f"unchanged: {', '.join(differ)} differ",
                file=sys.stderr,
            )
            status = common.EXIT_FAILED
        else:
            print(f"ok: {args.topology} holds aggregator {card.index}'s card unchanged")
            print(f"fingerprint {fingerprint(topology)}")
    for path in args.results:
        try:
            statement = verify_saved(topology, path)  # block by block: any d in flat memory
        except ConfigError:
            raise
        except (MpcAggError, OSError, ValueError, KeyError) as exc:
            print(f"MISMATCH: {path}: {exc}", file=sys.stderr)
            status = common.EXIT_FAILED
            continue
        print(
            f"ok: {path}: round {statement.round_id}, {statement.num_clients} clients, "
            f"d = {statement.dim}, vouched for by all {topology.m} aggregators"
        )
    return status
