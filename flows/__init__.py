"""Prefect flows (the round loop) and the ``fedtune`` command line."""
