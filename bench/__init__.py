"""`make bench`: the broker against direct, PgBouncer and nginx baselines on loopback."""
