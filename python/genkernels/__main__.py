"""Command line: ``python -m genkernels info``, ``python -m genkernels bench`` and
``python -m genkernels demo gpt|vae|gan``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print what this installation holds and can run")
    bench = commands.add_parser("bench", help="measure every op beside its PyTorch reference")
    demo = commands.add_parser("demo", help="train a model on real data and write what it generates")
    from . import demos
    from .bench import add_arguments

    add_arguments(bench)
    demos.add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        print(json.dumps(info(), indent=2))
        return 0
    if args.command == "demo":
        return demos.main(args)
    from .bench import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
