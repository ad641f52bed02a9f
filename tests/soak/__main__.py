"""`python -m tests.soak [SECONDS] [--seconds SECONDS] [--token-lifetime SECONDS]`: run the soak
and print its report; the exit status is 1 if any criterion failed (what `make soak` runs)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from tests.soak.driver import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("duration", nargs="?", type=float, help="seconds of load")
    parser.add_argument(
        "--seconds", type=float, default=defaults.seconds, help="seconds of load (default 300)"
    )
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=defaults.token_lifetime,
        help="lifetime of the tokens Entra issues, in seconds (default 90)",
    )
    parser.add_argument("--quiet", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    seconds = args.duration if args.duration is not None else args.seconds
    if seconds < 10:
        parser.error("the soak needs at least 10 seconds")
    config = dataclasses.replace(defaults, seconds=seconds, token_lifetime=args.token_lifetime)

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    report = asyncio.run(run_soak(config, progress=progress))
    print(report.render())
    failures = report.failures()
    print("soak: PASSED" if not failures else f"soak: FAILED ({len(failures)} criteria)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
