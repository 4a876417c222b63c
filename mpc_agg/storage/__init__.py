"""What an aggregator keeps on disk, apart from the protocol: the index of every round id it
ever opened (:mod:`mpc_agg.storage.round_index`) and the durability helpers it relies on
(:mod:`mpc_agg.storage.durable`). See docs/design.md, "Durable state"."""
