"""The Flower engine: the same federation as a Flower ServerApp and ClientApp (Message API).

Flower code lives only in this package; allocation, training, aggregation and evaluation are
the shared core's.
"""
