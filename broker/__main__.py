"""`python -m broker` is `sidekey`."""

from broker.cli import main

raise SystemExit(main())
