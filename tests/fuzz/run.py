"""`make fuzz FUZZ_TIME=<seconds per target> [FUZZ_RUNS=<cases per target>]`: every harness
of tests/fuzz/targets.py under atheris (coverage-guided, libFuzzer), corpus in
tests/fuzz/corpus/<target>/; a target stops after FUZZ_TIME seconds or FUZZ_RUNS cases,
whichever comes first. Prints cases run and crashes found per target, and exits non-zero on
any crash (its input is kept in tests/fuzz/crashes/<target>/ to replay with
`python -m tests.fuzz.run --replay FILE`).

atheris ships manylinux wheels with libFuzzer built in, so no clang is needed to install it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
# Inputs larger than this teach the fuzzer nothing the parsers' limits do not already cut.
MAX_LEN = 4096


def one(name: str, seconds: int, runs: int = -1) -> None:
    """Run inside a child process: fuzz target `name` for `seconds`, or until it ran `runs`
    cases (-1: no limit), whichever comes first."""
    import atheris

    with atheris.instrument_imports(include=["broker", "adapters", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS

    target = TARGETS[name]

    def test_one_input(data: bytes) -> None:
        # The first byte picks where the input is split in two: the parsers must give the
        # same verdict for bytes that arrive in pieces.
        if not data:
            target([b""])
            return
        cut = data[0] % len(data)
        body = data[1:]
        target([body[:cut], body[cut:]])

    crash_dir = CRASHES / name
    crash_dir.mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            str(CORPUS / name),
            f"-max_total_time={seconds}",
            f"-runs={runs}",
            f"-max_len={MAX_LEN}",
            "-print_final_stats=1",
            f"-artifact_prefix={crash_dir}/",
            "-timeout=10",
            "-rss_limit_mb=2048",
        ],
        test_one_input,
    )
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--time", type=int, default=60, help="seconds per target")
    parser.add_argument(
        "--runs", type=int, default=-1, help="stop a target after this many cases (-1: none)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="targets to run (default: all)")
    parser.add_argument("--replay", type=Path, help="run one saved input through its target")
    args = parser.parse_args()
    if args.one:
        one(args.one, args.time, args.runs)
        return 0
    from tests.fuzz.targets import TARGETS

    if args.replay:
        TARGETS[args.replay.parent.name]([args.replay.read_bytes()])
        print("no crash")
        return 0
    names = args.only or sorted(TARGETS)
    rows = []
    for name in names:
        (CORPUS / name).mkdir(parents=True, exist_ok=True)
        before = set((CRASHES / name).glob("*")) if (CRASHES / name).exists() else set()
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.run", "--one", name, "--time", str(args.time),
             "--runs", str(args.runs)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
            check=False,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
        done = re.findall(r"Done (\d+) runs", output)
        cases = int(runs[-1]) if runs else int(done[-1]) if done else 0
        crashes = len(set((CRASHES / name).glob("*")) - before)
        if proc.returncode != 0 and crashes == 0:
            crashes = 1  # died without an artifact: say so
            (HERE / f"{name}.log").write_text(output)
        rows.append((name, cases, crashes, time.monotonic() - started))
        print(
            f"{name:20s} {cases:>12,} cases {crashes:>3} crashes "
            f"{time.monotonic() - started:6.0f}s  corpus {len(list((CORPUS / name).glob('*')))}",
            flush=True,
        )
        if crashes:
            print(output[-3000:])
    total = sum(r[1] for r in rows)
    crashed = sum(r[2] for r in rows)
    print(f"total: {total:,} cases run, {crashed} crashes found, {len(rows)} targets")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
