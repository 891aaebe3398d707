"""Target-protocol adapters, one module per protocol, registered by entry point."""
