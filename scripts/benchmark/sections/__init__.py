"""One module per benchmark section (client, ingest, reveal, grid, flower): its
measurement and its table."""
