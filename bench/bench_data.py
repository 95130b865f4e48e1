"""First (decode) and second (cache hit) load time of CIFAR-10 (JPEG) from ../shared/data.

    python bench/bench_data.py [--tarball PATH] [--workers N] [--out bench/results/data_load.json]

The first load reads the 60,000 JPEGs straight out of the tarball and decodes them with Pillow into a fresh,
temporary cache folder; the second load reads the cached ``.npz`` arrays. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch

from qrobust import __version__
from qrobust.data import load_dataset, registry

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarball", type=Path, default=ROOT / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: qrobust's choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_load.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.tarball.is_file():
        logging.error("%s not found; pass --tarball", args.tarball)
        return 1
    if args.workers is not None:
        os.environ[registry.WORKERS_ENV] = str(args.workers)

    result: dict = {
        "benchmark": "data_load",
        "dataset": "CIFAR-10 (JPEG)",
        "source": os.path.relpath(args.tarball.resolve(), ROOT),
        "decode_workers": registry.decode_workers(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            "qrobust": __version__,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "torch": torch.__version__,
        },
        "splits": {},
    }
    with tempfile.TemporaryDirectory(prefix="qrobust-bench-cache-") as cache:
        for split in ("train", "test"):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                ds = load_dataset("cifar10", split, root=args.tarball, cache_dir=cache)
                times.append(time.perf_counter() - t0)
            result["splits"][split] = {
                "n": len(ds),
                "first_load_s": round(times[0], 3),
                "second_load_s": round(times[1], 3),
                "images_per_s_first": round(len(ds) / times[0], 1),
            }
        result["cache_bytes"] = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    result["first_load_total_s"] = round(sum(s["first_load_s"] for s in result["splits"].values()), 3)
    result["second_load_total_s"] = round(sum(s["second_load_s"] for s in result["splits"].values()), 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
