"""Command-line tools run from a checkout (README, "Layout"). A package so that the
benchmark, :mod:`scripts.benchmark`, imports normally from the repository root."""
