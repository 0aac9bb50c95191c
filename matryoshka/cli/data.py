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
    if args.colour_captions and not (args.name == "emoji" or args.source == "emoji"):
        raise UserError("--colour-captions names the colours of the emoji set: use it with emoji or --from emoji")
    if args.name == "shards":
        return cmd_shards(args, out)
    if args.name == "emoji-motion":
        return _export_motion(args, out)
    if args.label == "folder":
        raise UserError("--label for emoji is none, group or subgroup")
    summary = export_emoji(out, size=args.size, label=args.label, colour_captions=args.colour_captions)
    print(
        f"exported {summary['count']} emoji images in {len(summary['class_names'])} classes to {args.out} "
        f"(class folders, caption .txt sidecars and metadata.jsonl; use data.source=imagefolder data.path={args.out})"
    )
    return 0


def _holds_videos(folder: Path) -> bool:
    """A folder with at least one video file other than a gif (gifs alone are read as images)."""
    from ..data.clips import VIDEO_EXTENSIONS

    suffixes = set(VIDEO_EXTENSIONS) - {".gif"}
    return any(path.suffix.lower() in suffixes for path in folder.rglob("*") if path.is_file())


def shards_source(args: argparse.Namespace):
    """The DataConfig of ``--from``: emoji, emoji-motion, an image or video folder, tar shards, a TSV or HF data."""
    from ..data import DataConfig

    source = Path(args.source).expanduser()
    folder_label = "folder" if args.label == "folder" else "none"
    if args.source == "emoji":
        return DataConfig(
            source="emoji", resolution=args.size, label=args.label, captions=True, colour_captions=args.colour_captions
        )
    if args.source == "emoji-motion":
        return DataConfig(source="emoji-motion", resolution=args.size, frames=args.frames, captions=True)
    if args.source.endswith((".parquet", ".arrow")) or (source / "state.json").is_file():
        return DataConfig(source="hf", path=args.source, resolution=args.size, captions=True)
    if source.is_dir() and not any(source.glob("*.tar")):
        if _holds_videos(source):
            # --frames is the shortest clip kept: shorter videos are reported and left out
            return DataConfig(
                source="videofolder", path=str(source), frames=args.frames, label=folder_label, captions=True
            )
        return DataConfig(source="imagefolder", path=str(source), label=folder_label, captions=True)
    kind = "mlmdm-tsv" if args.source.endswith(".tsv") else "webdataset"
    return DataConfig(source=kind, path=args.source, resolution=args.size, captions=True)


def cmd_shards(args: argparse.Namespace, out: Path) -> int:
    from ..data import build_dataset, print_skip_report
    from ..data.shard_writer import write_shards

    if not args.source or args.per_shard < 1:
        raise UserError(
            "mdm data shards needs --from FOLDER|emoji|emoji-motion|SHARDS.tar|INDEX.tsv|DATA.parquet "
            "and --per-shard N >= 1"
        )
    if args.frames < 1 or (args.count is not None and args.count < 1) or args.fps <= 0:
        raise UserError("--frames and --count must be >= 1, --fps > 0")
    cfg = shards_source(args)
    dataset = build_dataset(cfg)
    print_skip_report(dataset)
    summary = write_shards(dataset, out, args.per_shard, count=args.count, fps=args.fps)
    frames = f" data.frames={args.frames}" if cfg.frames else ""
    print(
        f"wrote {summary['count']} {'clips' if cfg.frames else 'samples'} in {summary['shards']} shards to {out} "
        f"(use data.source=shards data.path='{summary['pattern']}'{frames})"
    )
    return 0


def _export_motion(args: argparse.Namespace, out: Path) -> int:
    from ..data.emoji_motion import export_emoji_motion

    if args.size < 8 or args.frames < 1 or (args.count is not None and args.count < 1) or args.fps <= 0:
        raise UserError("--size must be >= 8, --frames and --count >= 1, --fps > 0")
    summary = export_emoji_motion(out, size=args.size, frames=args.frames, fps=args.fps, count=args.count)
    print(
        f"exported {summary['count']} emoji-motion clips ({args.frames} frames at {args.size}², mp4 with caption "
        f".txt sidecars) to {args.out}; use data.source=videofolder data.path={args.out} data.frames={args.frames}"
    )
    return 0


def add_parsers(commands: argparse._SubParsersAction) -> None:
    presets = commands.add_parser("presets", help="list the presets")
    presets.set_defaults(func=cmd_presets)

    data = commands.add_parser("data", help="export a built-in dataset, or write any data as WebDataset shards")
    data.add_argument("name", choices=["emoji", "emoji-motion", "shards"])
    data.add_argument("--out", required=True)
    data.add_argument(
        "--size",
        type=int,
        default=64,
        help="side in pixels (emoji-motion: 32 is the emoji-video size; image folders keep their files)",
    )
    data.add_argument(
        "--label",
        default="group",
        choices=["none", "group", "subgroup", "folder"],
        help="emoji: none/group/subgroup; shards from a folder: folder (first-level folders) or none",
    )
    data.add_argument(
        "--from",
        dest="source",
        help="shards: an image or video folder (a folder with mp4/webm/avi/mkv/mov/m4v files), emoji, emoji-motion, "
        "tar shards, an ml-mdm TSV or a local Hugging Face data set",
    )
    data.add_argument(
        "--colour-captions",
        action="store_true",
        help="emoji (also as shards): captions name the main colours too, as data.colour_captions ('red heart, red')",
    )
    data.add_argument("--per-shard", type=int, default=1000, help="shards: samples per shard")
    data.add_argument(
        "--frames",
        type=int,
        default=8,
        help="emoji-motion: frames per clip; shards from a video folder: videos with fewer frames are left out",
    )
    data.add_argument(
        "--fps", type=float, default=8.0, help="emoji-motion (also as shards): frames per second of the mp4s"
    )
    data.add_argument(
        "--count", type=int, help="emoji-motion and shards: only the first COUNT clips/samples (default: all)"
    )
    data.set_defaults(func=cmd_data)
