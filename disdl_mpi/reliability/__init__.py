"""Reliability: the per-step NaN/signal agreement (``guards``) and collective checkpoints."""
