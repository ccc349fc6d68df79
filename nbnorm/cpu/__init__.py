"""Numba CPU kernels; ``ops`` runs them for ``nbnorm.api``."""
