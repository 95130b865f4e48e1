"""The README's tour runs as written — twice in the same folder (a rerun reuses its runs) — and prints the
numbers it computes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## A tour"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_tour_runs_twice_and_prints_its_numbers(tmp_path):
    code = _tour()
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "QROBUST_NO_PROGRESS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    for out in outs:
        assert re.search(r"PGD-20: \d+\.\d% robust", out)
        assert "ε=0.1: robust" in out and re.search(r"reloaded: \d+\.\d% clean", out)
    # the second run reuses the checkpoints and reports the same numbers
    assert outs[0].splitlines()[-4:] == outs[1].splitlines()[-4:]
