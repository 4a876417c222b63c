"""One module per benchmark section (client, ingest, reveal, uploads, sequential, grid, rss,
flower, large, cost for cost1e9): its measurement and its table."""
