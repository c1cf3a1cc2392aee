"""`dealrec serve` and `dealrec worker` refuse unsafe or wrong configurations with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dealrec(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEALREC_")}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**clean, "PYTHONPATH": str(ROOT), **env})


def test_serve_refuses_to_start_without_keys():
    r = dealrec("serve", "--port", "1")
    assert r.returncode == 2 and "no API keys configured" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--queues", "gpu", "--pool", "prefork"], "must not fork"),
    (["--queues", "cpu,tpu"], "tpu"),
])
def test_worker_refuses_bad_options(args, message):
    r = dealrec("worker", *args)
    assert r.returncode == 2 and message in r.stderr
