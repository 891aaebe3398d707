"""The PostgreSQL adapter: mTLS (or local) clients in, just-in-time credentials upstream.

Registered as the ``postgres`` entry point of ``sidekey.adapters``.
"""

from ._adapter import PostgresAdapter

__all__ = ["PostgresAdapter"]
