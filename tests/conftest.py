"""Shared fixtures: the dev PKI (tests/pki.py) and real servers (tests/servers.py)."""

pytest_plugins = ["tests.pki", "tests.servers"]
