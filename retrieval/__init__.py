"""Retrieval over embedding shards: search, the KNN evaluation (learned vs handcrafted vs none), robustness,
the paper's experiments (width table, task ablation) and the HTML report."""
