"""reglab: a runnable course on regularization in transformer training."""
__version__ = "0.1.0"
