"""docs/drivers.md is what scripts/drivers_doc.py writes from the matrix's table: the page
cannot drift from the settings the matrix connects with."""

from __future__ import annotations

import subprocess
import sys

from tests.compat.harness import REPO


def test_drivers_page_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "drivers_doc.py"), "--check"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
