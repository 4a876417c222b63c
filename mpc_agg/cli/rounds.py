"""Placeholder: open, submit, collect, status, rounds, abort (being written)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the round commands."""
