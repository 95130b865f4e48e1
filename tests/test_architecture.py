"""The layering rules of docs/architecture.md hold: the import-linter contracts of pyproject.toml."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUN = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n"
)


def test_the_import_graph_keeps_the_layering_contracts():
    assert importlib.util.find_spec("importlinter") is not None, (
        "import-linter is missing: install the dev extra (pip install -e '.[dev]')"
    )
    # this checkout's sources, whatever qrobust the interpreter would import otherwise
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", _RUN], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
