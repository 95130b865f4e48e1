"""Suite-wide test settings: one torch thread (the tiny test models gain nothing from more, and the
machine has two cores), no progress bars."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qrobust

SRC = str(Path(qrobust.__file__).resolve().parents[1])

os.environ.setdefault("QROBUST_NO_PROGRESS", "1")
torch.set_num_threads(1)


@pytest.fixture
def torchrun():
    """Run ``python -m torch.distributed.run --nproc_per_node=2 ARGS`` on a free port (a fixed one collides with a
    torchrun left over from another test or job) with one thread per rank; returns the CompletedProcess and, with
    ``check``, asserts it succeeded, showing the ranks' stderr."""
    def run(*args: str, env: dict | None = None, timeout: int = 300, check: bool = True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        full = {**os.environ, "QROBUST_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **(env or {})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
        r = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0 or not check, f"torchrun exited {r.returncode}:\n{r.stderr[-3000:]}"
        return r

    return run
