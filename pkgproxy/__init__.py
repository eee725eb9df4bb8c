"""pkgproxy: one Twisted server that caches every package repository a fleet pulls from."""

__version__ = "0.1.0"
