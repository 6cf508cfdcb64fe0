"""Client-level differential privacy for heterogeneous partial updates (torch-free):
``mechanism`` (clipping a whole update, the noisy per-tensor mean, adaptive clipping's step),
``accountant`` (epsilon from Google's dp-accounting, for fedhello's sampler), ``server`` (one
round's private aggregate and the state it carries). Configured by ``[privacy]``
(``fedhello.core.config.privacy``)."""
