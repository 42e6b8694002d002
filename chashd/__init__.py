"""chashd: a consistent-hashing key-value system on Twisted.

Two daemons, ``twistd chash-gateway`` and ``twistd chash-kvstore``; see README.md.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
