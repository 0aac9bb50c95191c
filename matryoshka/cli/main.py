"""The ``mdm`` command line: one module per command, registered here."""

from __future__ import annotations

import argparse
import sys

from .errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdm", description="Matryoshka Diffusion Models: train and sample.")
    commands = parser.add_subparsers(dest="command", required=True)
    from . import convert, data, evaluate, sample, serve, train

    train.add_parser(commands)
    sample.add_parser(commands)
    data.add_parsers(commands)
    convert.add_parser(commands)
    evaluate.add_parsers(commands)
    serve.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may come after options such as --nproc
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.raw_argv = argv
    return run_command(args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
