"""Edges of the aggregator: HTTP server and client, and the on-disk journal."""
