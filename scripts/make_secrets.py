#!/usr/bin/env python
"""Create a topology's authentication secrets and hand out client tokens.

    python scripts/make_secrets.py CONFIG [--out DIR] [--client ID ...]

Creates, if missing, in DIR (default: secrets/<topology name> under the current directory):

    DIR/aggregator-{i}.key    aggregator i's 32-byte token key, 64 hex characters, mode 0600
    DIR/collector.token       the collector's bearer token, 64 hex characters, mode 0600

Existing files are kept (so tokens already handed out stay valid). With --client ID, prints
one line per client to stdout, ``ID t0,t1,...``, its tokens for aggregators 0..m-1
(mpc_agg.transport.auth.client_token). The aggregator keys are never printed; status lines
go to stderr.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from mpc_agg import Topology
from mpc_agg.core.codec import check_id
from mpc_agg.errors import ConfigError, InvalidRequest
from mpc_agg.transport.auth import (
    KEY_BYTES,
    aggregator_key_path,
    client_token,
    collector_token_path,
    load_secret,
)


def ensure_secret(path: Path) -> bool:
    """Create ``path`` with 32 random bytes in hex (mode 0600) unless it exists.

    Returns True if it was created. Creation is exclusive, so two concurrent runs cannot
    both write it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def client_tokens(keys: Sequence[bytes], client_id: str) -> list[str]:
    """``client_id``'s token for each aggregator, in index order."""
    return [client_token(key, client_id) for key in keys]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_secrets.py",
        description=(
            "Create, if missing, one token key per aggregator (aggregator-{i}.key) and the "
            "collector's token (collector.token), 32 random bytes in hex with mode 0600; "
            "with --client, print each client's tokens for aggregators 0..m-1."
        ),
        epilog=(
            "Deploying: aggregator i needs only aggregator-{i}.key (and collector.token to check "
            "the collector); the collector needs collector.token; a client needs only its own "
            "line of tokens. Existing files are kept, so re-running adds clients without "
            "invalidating tokens already handed out."
        ),
    )
    parser.add_argument("config", help="topology YAML, e.g. configs/local-3.yaml")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="directory for the secrets (default: the topology's auth.secrets_dir, else "
        "secrets/<topology name>)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="ID",
        help="print the tokens of client ID as 'ID t0,t1,...' (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        for client_id in args.client:
            check_id("client", client_id)
    except InvalidRequest as exc:
        parser.error(str(exc))
    try:
        topology = Topology.load(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    default = topology.auth.secrets_dir if topology.auth else Path("secrets") / topology.name
    out = args.out if args.out is not None else default
    out.mkdir(parents=True, exist_ok=True, mode=0o700)

    paths = [aggregator_key_path(out, i) for i in range(topology.m)]
    paths.append(collector_token_path(out))
    for path in paths:
        verb = "created" if ensure_secret(path) else "kept existing"
        print(f"{verb} {path}", file=sys.stderr)
    try:
        keys = [load_secret(p, yaml_path="auth") for p in paths[:-1]]
        load_secret(paths[-1], yaml_path="auth")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for client_id in args.client:
        print(f"{client_id} {','.join(client_tokens(keys, client_id))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
