"""The README's first command on a fresh virtualenv: install from a clean clone, then `qrobust demo`, timed.

    python bench/bench_fresh_install.py          # ≈ 2–3 min

Checks that the install pulled the CPU build of torch 2.13.0 and no CUDA packages; writes
bench/results/fresh_install_demo.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "clone", "-q", str(REPO), str(tmp / "clone")], check=True)
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
        pip, qrobust = tmp / "venv" / "bin" / "pip", tmp / "venv" / "bin" / "qrobust"
        t0 = time.perf_counter()
        subprocess.run([str(pip), "install", "-q", "-c", str(tmp / "clone" / "constraints.txt"),
                        str(tmp / "clone")], check=True, capture_output=True)
        install_s = time.perf_counter() - t0
        packages = subprocess.run([str(pip), "list", "--format=json"], check=True, capture_output=True, text=True)
        names = {p["name"].lower(): p["version"] for p in json.loads(packages.stdout)}
        cuda = sorted(n for n in names if n.startswith("nvidia") or "cuda" in n)
        t0 = time.perf_counter()
        demo = subprocess.run([str(qrobust), "demo", "--out", str(tmp / "demo")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "QROBUST_CACHE": str(tmp / "cache"), "HOME": str(tmp)})
        demo_s = time.perf_counter() - t0
        result = {"install_s": install_s, "torch": names.get("torch"), "cuda_packages": cuda,
                  "demo_exit_code": demo.returncode, "demo_wall_s": demo_s,
                  "demo_table": [ln for ln in demo.stdout.splitlines() if ln.startswith("|")],
                  "load_average_1min": float(Path("/proc/loadavg").read_text().split()[0])}
    from qrobust.utils import atomic_write_text

    atomic_write_text(HERE / "results" / "fresh_install_demo.json", json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if demo.returncode == 0 and not cuda and "+cpu" in (result["torch"] or "") else 1


if __name__ == "__main__":
    sys.exit(main())
