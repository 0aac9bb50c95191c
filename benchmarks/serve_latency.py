"""Latency of one `mdm serve` generation at the page's CPU defaults (12 DPM++(2M) steps, 4 images).

    OMP_NUM_THREADS=2 python benchmarks/serve_latency.py runs/emoji64-demo

The sampling alone (after one warm-up call); the page adds its live frames, the GIF and the zip.
"""

import sys
import time

from matryoshka.serve.catalog import load_models
from matryoshka.serve.generation import generate
from matryoshka.serve.settings import parse_settings

model = next(iter(load_models([sys.argv[1]], "cpu").values()))
settings = parse_settings(model, "", "", None, "dpm++2m", 12, 1.0, 0.0, 1.0, 0, False, 4)
generate(settings)  # warm-up
start = time.perf_counter()
generate(settings)
print(f"{time.perf_counter() - start:.1f} s")
