"""The mpc_agg benchmark: ``python -m scripts.benchmark`` (or ``python scripts/bench.py``).

Sections, options and output are described in :mod:`scripts.benchmark.cli`; the figures
feed the README's "Cost model and performance". A package under ``scripts/`` so that tests
import its pieces normally; no benchmark code is in the installed ``mpc_agg`` package.
"""
