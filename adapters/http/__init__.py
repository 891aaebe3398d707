"""The HTTP adapter: an mTLS reverse proxy that injects the credential as request headers.

Registered as the ``http`` entry point of ``sidekey.adapters``. `adapter.py` is the protocol
part on the core's request steps, written against `exchange.py`'s interfaces; `server.py`
and `upstream.py` are its two HTTP/1.1 wire sides (`head.py` the head renderer both share),
`h2server.py` and `h2upstream.py` the same two sides over HTTP/2, and `grpc.py` the broker's
own answers to a gRPC call.
"""

from .adapter import HttpAdapter

__all__ = ["HttpAdapter"]
