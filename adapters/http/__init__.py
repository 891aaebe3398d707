"""The HTTP adapter: an mTLS reverse proxy that injects the credential as request headers.

Registered as the ``http`` entry point of ``sidekey.adapters``. `adapter.py` is the protocol
part on the core's request steps; `server.py` and `upstream.py` are its two HTTP/1.1 wire
sides, and `head.py` the head renderer both share.
"""

from .adapter import HttpAdapter

__all__ = ["HttpAdapter"]
