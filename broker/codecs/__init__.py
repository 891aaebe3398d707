"""Sans-IO protocol codecs: bytes in, typed messages out. No asyncio, no sockets."""
