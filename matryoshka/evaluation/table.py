"""An evaluation report as the table ``mdm eval`` prints."""

from __future__ import annotations

from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """The metrics as a table: one row per metric, one column per level."""
    levels = report["levels"]
    rows: dict[str, dict[str, float]] = {}
    for key, value in report["metrics"].items():
        name, level = key.rsplit("/", 1)
        rows.setdefault(name, {})[level] = value
    width = max([len("metric")] + [len(name) for name in rows])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{level:>12}" for level in levels)]
    for name, values in rows.items():
        cells = [f"{values[level]:>12.6g}" if level in values else f"{'-':>12}" for level in levels]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    feature = report.get("feature")
    if feature:
        note = (
            "FID-comparable (standard weights)"
            if feature.get("fid_comparable")
            else "NOT comparable with published FIDs"
        )
        lines.append(f"features: {feature['name']} ({feature['dim']}-d, {feature['weights']}): {note}")
    sampling = report["sampling"]
    lines.append(
        f"N={report['num']} samples, {sampling['sampler']} {sampling['steps']} steps, guidance "
        f"{sampling['guidance']:g}, "
        f"seed {sampling['seed']}, "
        + "".join(f"{name} {value}, " for name, value in sorted(sampling.get("options", {}).items()))
        + (f"autoguidance {sampling['autoguidance']}, " if sampling.get("autoguidance") else "")
        + f"checkpoint step {report['step']}"
        + (f" ({report['train_minutes']:g} training minutes)" if report.get("train_minutes") is not None else "")
    )
    video = report.get("video")
    if video:
        lines.append(
            f"video: clips of {video['level_frames']} frames per level; fd/kid/pr/clip per frame (not FVD); "
            "frame_diff, frame_dist: generated clips, *_ref: reference clips (docs/video.md#evaluation)"
        )
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    return "\n".join(lines)
