"""Plot the motion-direction fraction against training minutes, one line per run and level.

    python benchmarks/motion_curve.py benchmarks/results/motion_emoji_video_text_60min.json \
        benchmarks/results/motion_emoji_video_text_60min_first_preset.json --out docs/images/video/motion_curve.png

Each JSON holds ``points``: ``{"minutes": M, "levels": {"8x32x32": {"fraction": f}, ...}}`` (written by
hand or a script from ``benchmarks/motion_direction.py`` reports of a run's checkpoints) and a ``run``
line whose text before the first colon names the run in the legend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for path in args.results:
        data = json.loads(path.read_text())
        label = data.get("run", path.stem).split(":")[0]
        levels = sorted({name for point in data["points"] for name in point["levels"]})
        for level in levels:
            points = [(p["minutes"], p["levels"][level]["fraction"]) for p in data["points"] if level in p["levels"]]
            minutes, fractions = zip(*points)
            axes.plot(minutes, [100 * f for f in fractions], marker="o", label=f"{label}, {level}")
    axes.axhline(25, color="grey", linestyle=":", label="chance")
    axes.axhline(80, color="grey", linestyle="--", label="target")
    axes.set_xlabel("training minutes on 2 CPU cores")
    axes.set_ylabel("clips moving the prompted way (%)")
    axes.set_ylim(0, 105)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
