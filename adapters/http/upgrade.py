"""WebSocket through the HTTP adapter: the handshake is a request like any other, then a splice.

The client's upgrade request walks the adapter's usual plan (identify, authorize, credential,
inject) and goes upstream with ``Connection: Upgrade``. When the upstream answers 101, the 101
goes back to the client (minus hop-by-hop fields and anything carrying the credential) and
both connections are handed to the core's byte relay (`broker.session.splice`): frames are not
parsed, so ping/pong, close codes, fragmented and compressed messages pass exactly as sent,
with the relay's backpressure. Any other answer is relayed as a plain response, and the client
connection is closed after it (an upgrade request is always its connection's last).
"""

from __future__ import annotations

from typing import TypeVar

from adapters.http.exchange import Fields
from adapters.http.server import Request
from adapters.http.upstream import UpstreamResponse
from broker.session.net import Conduit
from broker.session.splice import SpliceResult, SpliceStats, splice

T = TypeVar("T")


async def splice_upgraded(
    request: Request[T],
    reply: UpstreamResponse,
    headers: Fields,
    *,
    idle_timeout: float,
    stats: SpliceStats,
) -> SpliceResult:
    """Send the 101 with `headers` and relay both connections until either side ends.

    Raises UpstreamProtocolError (nothing sent to the client yet: it may still get a 502) if
    the upstream closed right after its 101, InvalidResponseHead if `headers` would break the
    101's head, ConnectionResetError if the client has gone.
    """
    up_transport, up_tail = reply.take_over()
    try:
        client_transport, client_tail = request.switch_protocols(headers)
    except BaseException:
        up_transport.abort()
        raise
    # No await between the hand-overs and the splice: each conduit becomes its transport's
    # protocol at once, so nothing either side sends meanwhile is lost.
    client = Conduit.adopt("client", client_transport, client_tail)
    upstream = Conduit.adopt("upstream", up_transport, up_tail)
    return await splice(client, upstream, idle_timeout=idle_timeout, stats=stats)
