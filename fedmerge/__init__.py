"""fedmerge: data-isolated cross-domain sequential recommendation by federated model merging.

The package is framework-free: Flower apps in ``clients/`` and ``server/`` are thin layers over it.
"""

__version__ = "0.1.0"
