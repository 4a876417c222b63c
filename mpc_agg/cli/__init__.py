"""The ``mpc-agg`` command (also ``python -m mpc_agg``): one entry point, one subcommand per
job. README, "Command line" and "Deploying across organisations".

Each subcommand lives in a module of this package that registers its parser
(:func:`register`) and returns an exit status; errors reach :func:`main` as typed exceptions
and leave as one ``error:`` line and an exit status from :data:`EXIT_CODES`, never as a
traceback. ``party`` hands its arguments to :func:`mpc_agg.party.main` unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mpc_agg.cli import common

EXIT_CODES = common.EXIT_CODES

_PASS_THROUGH: dict[str, tuple[str, str]] = {
    "party": (
        "mpc_agg.party",
        "run one aggregator party from the shared topology and its own party directory",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mpc-agg`` parser with every subcommand."""
    from mpc_agg.cli import demo, keys, launch, rounds

    parser = argparse.ArgumentParser(
        prog="mpc-agg",
        description=(
            "mpc_agg: clients secret-share vectors to non-colluding aggregators, which reveal "
            "only the total (optionally with differential-privacy noise added inside the MPC). "
            "Run `mpc-agg COMMAND --help` for each command."
        ),
        epilog=common.EXIT_HELP
        + "\n\nDeploying across organisations (README): keygen -> exchange cards -> assemble "
        "-> verify --card -> token -> party -> open/submit/collect -> verify.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mpc_agg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in _PASS_THROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    launch.register(sub)
    demo.register(sub)
    keys.register(sub)
    rounds.register(sub)
    return parser


def _version() -> str:
    from mpc_agg import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mpc-agg`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in _PASS_THROUGH:
        import importlib

        module = importlib.import_module(_PASS_THROUGH[args_list[0]][0])
        entry: Callable[..., int] = module.main
        return entry(args_list[1:], prog=f"mpc-agg {args_list[0]}")
    parser = build_parser()
    args = parser.parse_args(args_list)
    return common.run(args.run, args)
