"""CLI: ``python -m emc2jax.reproduce NAME --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from emc2jax.reproduce import TARGETS, get_target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emc2jax.reproduce",
        description="Reproduce a paper result; writes results.json, PNG figures and report.md.",
    )
    parser.add_argument("name", choices=sorted(TARGETS), help="the experiment to run")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    parser.add_argument(
        "--quick", action="store_true", help="reduced setting (minutes on 2 CPU cores)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    get_target(args.name)(args.out, quick=args.quick)
    print(
        f"{args.name}: done in {time.perf_counter() - start:.1f}s; wrote {args.out}/results.json, report.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
