"""The driver matrix (issue 21.5): the same everyday features through the broker with each
driver its users run, configured as they configure it (see tests/compat/README.md)."""
