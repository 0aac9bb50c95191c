"""``mdm presets`` and ``mdm data``: what can be trained, and the built-in data as files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config.presets import describe_presets
from .errors import UserError


def cmd_presets(_args: argparse.Namespace) -> int:
    width = max(len(name) for name, _ in describe_presets())
    for name, summary in describe_presets():
        print(f"{name:<{width}}  {summary}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.emoji import export_emoji

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds files: export into a new or empty folder")
    summary = export_emoji(out, size=args.size, label=args.label)
    print(f"exported {summary['count']} emoji images in {len(summary['class_names'])} classes to {args.out} "
          f"(class folders, caption .txt sidecars and metadata.jsonl; use data.source=imagefolder data.path={args.out})")
    return 0


def add_parsers(commands: argparse._SubParsersAction) -> None:
    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(func=cmd_presets)

    data = commands.add_parser("data", help="export a built-in dataset")
    data.add_argument("name", choices=["emoji"])
    data.add_argument("--out", required=True)
    data.add_argument("--size", type=int, default=64)
    data.add_argument("--label", default="group", choices=["none", "group", "subgroup"])
    data.set_defaults(func=cmd_data)
