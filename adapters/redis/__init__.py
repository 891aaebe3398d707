"""The Redis/Valkey adapter: mTLS (or local) clients in, a per-workload ACL user upstream.

Registered as the ``redis`` entry point of ``sidekey.adapters``.
"""

from ._adapter import RedisAdapter

__all__ = ["RedisAdapter"]
