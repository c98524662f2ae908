"""Shared helpers: data, FLOPs, checkpoints, statistics, training engine."""
