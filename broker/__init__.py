"""Sidekey: a secretless credential broker."""

__version__ = "0.1.0"
