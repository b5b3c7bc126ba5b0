"""specan: spectral dynamics of neural-network weights, from checkpoints to figures."""

__version__ = "0.1.0"
