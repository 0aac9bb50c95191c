"""Samples per second of the streaming ``shards`` source: 64x64 PNG and 256x256 JPEG shards,
read from local files and over HTTP (a local ``python -m http.server``), with 0, 1 and 2
DataLoader workers.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --samples 1024 --per-shard 256

Each configuration reads ``--samples`` samples (after one warm-up batch, which includes
starting the workers and filling the shuffle window) and decodes them to the images' own
resolution. Prints one JSON line per configuration and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from matryoshka.data import DataConfig, build_dataset, make_loader

FORMATS = {"png64": ("png", 64, "PNG"), "jpg256": ("jpg", 256, "JPEG")}


def write_shards(root: Path, name: str, count: int, per_shard: int) -> str:
    """``count`` random-texture images (noise compresses badly, like photos) in shards of ``per_shard``."""
    import webdataset

    ext, size, fmt = FORMATS[name]
    rng = np.random.default_rng(0)
    folder = root / name
    folder.mkdir()
    # smooth noise: random at 1/8 resolution, upscaled, so PNG/JPEG sizes are photo-like rather than worst case
    with webdataset.ShardWriter(str(folder / "shard-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            small = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
            buffer = io.BytesIO()
            small.resize((size, size), Image.BICUBIC).save(buffer, format=fmt)
            sink.write({"__key__": f"{i:07d}", ext: buffer.getvalue(), "txt": f"image {i}"})
        shards = sink.shard
    return f"shard-{{0000..{shards - 1:04d}}}.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(path: str, resolution: int, workers: int, samples: int, batch_size: int) -> float:
    cfg = DataConfig(source="shards", path=path, resolution=resolution, captions=True, num_workers=workers)
    loader = make_loader(build_dataset(cfg), batch_size=batch_size, seed=0, num_workers=workers)
    try:
        next(loader)  # warm-up: workers start, first shards open, shuffle windows fill
        start = time.perf_counter()
        for _ in range(samples // batch_size):
            next(loader)
        return (samples // batch_size) * batch_size / (time.perf_counter() - start)
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="samples timed per configuration")
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # enough shards for 2 workers, and more samples than are timed so no reader runs dry of its shards
        count = max(args.samples * 2, args.per_shard * 4)
        patterns = {name: write_shards(root, name, count, args.per_shard) for name in FORMATS}
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)  # let the server bind
            for name, (_, size, _) in FORMATS.items():
                mb = sum(p.stat().st_size for p in (root / name).glob("*.tar")) / count / 1e3
                for where, base in (("local", str(root)), ("http", f"http://127.0.0.1:{port}")):
                    for workers in args.workers:
                        rate = measure(f"{base}/{name}/{patterns[name]}", size, workers, args.samples, args.batch_size)
                        row = {
                            "format": name,
                            "kb_per_sample": round(mb, 1),
                            "where": where,
                            "workers": workers,
                            "samples_per_s": round(rate, 1),
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait()
    print("\n| shards | KB/sample | where | workers | samples/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['kb_per_sample']} | {r['where']} | {r['workers']} | {r['samples_per_s']} |")


if __name__ == "__main__":
    main()
