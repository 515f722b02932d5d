"""rgan-dist: Relativistic GANs trained at scale."""

__version__ = "0.1.0"
