"""Does a class-conditional emoji run draw the group it is asked for? Nearest-neighbour accuracy.

    python benchmarks/class_accuracy.py runs/emoji64-class --reference emoji-ref.npz --guidance 1 3 --num 16

For each class it samples ``--num`` images at each guidance scale (and ``--num`` unconditional
ones, the control) and classifies every sample by a vote of its ``--k`` nearest real emoji in
the evaluation's feature space (effnet-lite0 features of the top level, cosine similarity;
the real emoji's features come from the ``mdm eval-stats emoji`` file). Accuracy is the mean
over classes of the share of samples assigned to the class they were asked for. For scale,
the same classifier on the real emoji themselves (each left out of its own vote, the same
number per class) gives the ceiling, and unconditional samples labelled with every class in
turn give the floor. Prints the table, writes it as JSON to ``--out`` and one grid per
guidance scale (a row per class, its first eight samples) next to it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from matryoshka.data import DataConfig, EmojiDataset
from matryoshka.evaluation.features import build_feature_extractor, images_to_uint8
from matryoshka.pipeline import load_pipeline


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def knn_vote(queries: np.ndarray, reference: np.ndarray, labels: np.ndarray, k: int, skip: np.ndarray | None = None):
    """Majority label of each query's k most cosine-similar reference rows (ties: the nearer wins).

    ``skip``: per query, a reference row left out of its vote (the query itself), or -1."""
    similarity = unit_rows(queries) @ unit_rows(reference).T
    if skip is not None:
        rows = np.nonzero(skip >= 0)[0]
        similarity[rows, skip[rows]] = -np.inf
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    num_classes = int(labels.max()) + 1
    # One vote per neighbour, plus a fraction that decreases with rank so that ties go to the nearer one.
    votes = np.zeros((len(queries), num_classes))
    for rank in range(k):
        np.add.at(votes, (np.arange(len(queries)), labels[nearest[:, rank]]), 1 + (k - rank) * 1e-3)
    return votes.argmax(axis=1)


def balanced_accuracy(predicted: np.ndarray, wanted: np.ndarray, num_classes: int) -> list[float]:
    return [float(np.mean(predicted[wanted == c] == c)) for c in range(num_classes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a class-conditional emoji run (label=group or subgroup) or checkpoint")
    parser.add_argument("--reference", required=True, help="the .npz of `mdm eval-stats emoji` at the run's size")
    parser.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0])
    parser.add_argument("--num", type=int, default=16, help="samples per class")
    parser.add_argument("--k", type=int, default=5, help="neighbours per vote")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("class_accuracy.json"))
    args = parser.parse_args()

    pipe = load_pipeline(args.run)
    num_classes, size = pipe.model.config.num_classes, pipe.resolution
    stats = np.load(args.reference)
    if f"features_{size}" not in stats.files or str(stats["source"]) != "emoji":
        raise SystemExit(f"{args.reference} holds no emoji features at {size}² (mdm eval-stats emoji --levels {size})")
    reference = stats[f"features_{size}"].astype(np.float64)
    labels = EmojiDataset(DataConfig(label=pipe.config.data.label, resolution=pipe.config.data.resolution)).labels
    if len(labels) != len(reference) or not num_classes or labels.max() + 1 != num_classes:
        raise SystemExit("the run's classes or the reference's images are not the emoji set's")
    extractor = build_feature_extractor(str(stats["feature_name"]))

    rng = np.random.default_rng(args.seed)
    picked = np.concatenate([rng.choice(np.nonzero(labels == c)[0], args.num) for c in range(num_classes)])
    ceiling = balanced_accuracy(
        knn_vote(reference[picked], reference, labels, args.k, skip=picked), labels[picked], num_classes
    )
    rows = [{"samples": "real emoji (ceiling)", "accuracy": float(np.mean(ceiling)), "per_class": ceiling}]

    wanted = np.repeat(np.arange(num_classes), args.num)
    arms = [("unconditional (floor)", 1.0, -torch.ones(len(wanted), dtype=torch.long))]
    arms += [(f"guidance {g:g}", g, torch.as_tensor(wanted)) for g in args.guidance]
    for name, guidance, asked in arms:
        cond = pipe.condition(len(wanted), labels=asked)
        images = pipe.generate(cond=cond, guidance=guidance, steps=args.steps, seed=args.seed)[0]
        predicted = knn_vote(extractor(images).astype(np.float64), reference, labels, args.k)
        per_class = balanced_accuracy(predicted, wanted, num_classes)
        rows.append({"samples": name, "accuracy": float(np.mean(per_class)), "per_class": per_class})
        if asked.min() >= 0:
            pixels = images_to_uint8(images).transpose(0, 2, 3, 1).reshape(num_classes, args.num, size, size, 3)[:, :8]
            grid = np.concatenate([np.concatenate(list(row), axis=1) for row in pixels], axis=0)
            grid_path = args.out.with_name(f"{args.out.stem}_g{guidance:g}.png")
            Image.fromarray(grid).save(grid_path)
            print(f"grid: {grid_path}")

    print(f"| samples | group accuracy ({args.k}-NN, {args.num} per class) |\n| --- | --- |")
    for row in rows:
        print(f"| {row['samples']} | {row['accuracy']:.1%} |")
    names = pipe.class_names or [str(c) for c in range(num_classes)]
    print("per class: " + "; ".join(f"{n} {a:.0%}" for n, a in zip(names, rows[-1]["per_class"])))
    summary = {"run": str(args.run), "step": pipe.step, "num": args.num, "k": args.k, "classes": names, "rows": rows}
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
