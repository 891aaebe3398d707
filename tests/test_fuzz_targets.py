"""The fuzz harnesses of tests/fuzz/targets.py under hypothesis, in `make test`: arbitrary
bytes fed whole, one byte at a time and split at every offset; the only exception allowed
is each parser's own protocol error (the harness catches it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
# Examples per target: a few seconds each on a loaded 2-core box.
EXAMPLES = 150


def ways(data: bytes) -> list[list[bytes]]:
    whole = [data]
    bytewise = [data[i : i + 1] for i in range(len(data))]
    return [whole, bytewise]


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_whole_and_byte_by_byte(name: str, data: bytes) -> None:
    target: Callable[[list[bytes]], None] = TARGETS[name]
    for chunks in ways(data):
        target(chunks)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_inputs_split_at_every_offset(name: str) -> None:
    """Each saved corpus input (real protocol bytes the fuzzer grew from) split in two at
    every offset."""
    target = TARGETS[name]
    inputs = sorted((CORPUS / name).glob("*"))[:20]
    assert inputs, f"no corpus for {name} in {CORPUS / name}"
    for path in inputs:
        data = path.read_bytes()[:2000]
        target([data])
        for cut in range(len(data) + 1):
            target([data[:cut], data[cut:]])
