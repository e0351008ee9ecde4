"""Retrieval over embedding shards: nearest-neighbour search and the paper's KNN evaluation."""
