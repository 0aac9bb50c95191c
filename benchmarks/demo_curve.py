"""FD against training minutes for runs evaluated several times (e.g. the demo resumed in chunks).

    python benchmarks/demo_curve.py RUN/demo/*/eval.json --out docs/images/demo_curve.png
    python benchmarks/demo_curve.py old.json@10 old30.json@30 RUN/demo/*/eval.json   # minutes given by hand
    python benchmarks/demo_curve.py before=OLD/demo_curve.json now=R10.json now=R30.json   # two curves

Each argument is an ``mdm eval`` report, or the rows JSON an earlier call wrote (a list), optionally
behind ``LABEL=`` to name its curve (default "run"). A report's training minutes come from the report
(``train_minutes``, the trainer's count carried in the checkpoint) or from an ``@MINUTES`` suffix for
reports written before they carried it. Prints a markdown table, fits FD = a + b log2(minutes) per curve
and level over the points from ``--fit-from`` minutes on, and says when a curve's top level would reach
``--targets``: an extrapolation of the curve's recent slope, not a promise. Writes the rows as JSON and,
with matplotlib, a plot.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from time_to_quality import plot


def read_points(argument: str) -> list[dict]:
    label, separator, rest = argument.partition("=")
    if not separator or "/" in label:  # no label: the '=' (if any) belongs to the path
        label, rest = "", argument
    path, _, minutes = rest.partition("@")
    content = json.loads(Path(path).read_text())
    if isinstance(content, list):
        return [{**row, "arm": label or row["arm"]} for row in content]
    if minutes:
        trained = float(minutes)
    elif content.get("train_minutes") is not None:
        trained = float(content["train_minutes"])
    else:
        raise SystemExit(f"{path} does not say how long its checkpoint trained: give it as {path}@MINUTES")
    return [{"arm": label or "run", "minutes": trained, "step": content["step"], **content["metrics"]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "reports",
        nargs="+",
        help="mdm eval reports, [LABEL=]REPORT.json[@MINUTES], or rows it wrote, [LABEL=]ROWS.json",
    )
    parser.add_argument("--fit-from", type=float, default=30.0, help="fit the log-linear trend from these minutes on")
    parser.add_argument("--targets", type=float, nargs="*", default=[170.0, 120.0], help="FD values to project")
    parser.add_argument("--out", type=Path, help="plot path (.png); the rows go next to it as .json")
    args = parser.parse_args()

    rows = sorted((row for argument in args.reports for row in read_points(argument)), key=lambda row: row["minutes"])
    arms = list(dict.fromkeys(row["arm"] for row in rows))
    levels = sorted({key for row in rows for key in row if key.startswith("fd_")}, key=lambda k: -int(k.split("x")[-1]))
    print("| curve | minutes | step | " + " | ".join(level.split("/")[-1] for level in levels) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in levels) + " |")
    for row in sorted(rows, key=lambda row: arms.index(row["arm"])):
        values = " | ".join(f"{row[level]:.1f}" if level in row else "—" for level in levels)
        print(f"| {row['arm']} | {row['minutes']:g} | {row['step']:,} | {values} |")

    for arm in arms:
        for level in levels:
            points = [
                (row["minutes"], row[level])
                for row in rows
                if row["arm"] == arm and level in row and row["minutes"] >= args.fit_from
            ]
            if len(points) < 2:
                continue
            slope, intercept = np.polyfit([math.log2(m) for m, _ in points], [fd for _, fd in points], 1)
            line = f"{arm} {level}: {slope:+.1f} FD per doubling of the minutes (fit over {len(points)} points)"
            if slope < 0 and level == levels[0]:
                reach = ", ".join(
                    f"{target:g} at ~{2 ** ((target - intercept) / slope):,.0f} min" for target in args.targets
                )
                line += f"; on that line {reach}"
            print(line)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, levels, args.out)


if __name__ == "__main__":
    main()
