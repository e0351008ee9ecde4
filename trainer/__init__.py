"""Distributed training: Ray Train launches DeepSpeed data-parallel workers (see launch.py, loop.py)."""
