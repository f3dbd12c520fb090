"""Reusable test helpers. See `tests/helpers/distributed.py` for `run_distributed`."""
