"""What an aggregator keeps on disk: round journals (:mod:`mpc_agg.storage.journal`), the
privacy ledger (:mod:`mpc_agg.storage.ledger`), the index of every round id it ever opened
(:mod:`mpc_agg.storage.round_index`), and the durability helpers they share
(:mod:`mpc_agg.storage.durable`). See docs/design.md, "Durable state"."""
