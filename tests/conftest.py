"""Shared fixtures: the dev PKI (tests/pki.py), real servers (tests/servers.py), real SPIRE
(tests/spire.py), and the asyncio-and-uvloop runner of the connection-layer tests
(tests/loops.py)."""

pytest_plugins = ["tests.pki", "tests.servers", "tests.loops", "tests.spire"]
