"""One client connection, from accept to close.

`net` accepts and connects (with TLS upgrades in place), `context` holds what the core gives
one service's adapter and the steps every adapter shares (identify, authorize, audit),
`lifecycle` walks a TCP session through those steps once for every TCP protocol, and `splice`
relays the bytes afterwards. `adapter` is the adapter interface and its registry.
"""
