"""Engines run a federation: ``embedded`` in one process; Flower in its own package."""
