"""The MySQL/MariaDB adapter: mTLS (or local) clients in, a per-workload database user
upstream.

Registered as the ``mysql`` entry point of ``sidekey.adapters``.
"""

from ._adapter import MysqlAdapter

__all__ = ["MysqlAdapter"]
