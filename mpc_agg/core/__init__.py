"""The sans-I/O cryptographic and protocol core: pure functions and small state machines.

Modules in dependency order: ``field`` (GF(2^61-1) vectors), ``xof`` (seed expansion),
``ring`` (GF(2^61-1) or Z_(2^32) behind one interface), ``encoding`` (fixed point),
``sharing`` (additive shares), ``codec`` (wire formats), ``accumulator`` (running sums),
``rounds`` (round state machine and agreement).
Nothing here opens a socket or file, reads a clock, or imports ``mpyc``.
"""
