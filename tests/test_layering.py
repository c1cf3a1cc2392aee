"""The package layering holds: core imports neither the web layer nor the queue; the service layer
(worker/service) imports nothing of app/ or of the worker's runtime; the API process never loads
torch (it would cost every API worker seconds and hundreds of MB); the Python client imports none of them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("path", python_files("core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_neither_app_nor_worker(path):
    bad = {m for m in imported_modules(path) if _top(m) in ("app", "worker", "bench")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", python_files("worker/service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_layer_imports_no_app_and_no_worker_runtime(path):
    runtime = ("worker.runner", "worker.tasks", "worker.progress", "worker.validation")
    bad = {m for m in imported_modules(path) if _top(m) == "app" or m.startswith(runtime)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", python_files("app"), ids=lambda p: str(p.relative_to(ROOT)))
def test_api_talks_to_workers_only_through_the_service_layer_and_celery(path):
    allowed = ("worker.service", "worker.celery_app")
    bad = {m for m in imported_modules(path) if _top(m) == "worker" and not m.startswith(allowed)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_api_does_not_load_torch():
    code = "import sys; import app.main; app.main.create_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing app.main loaded torch"


@pytest.mark.parametrize("path", python_files("dealrec_client"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_client_stands_alone(path):
    """The Python client needs httpx only: it ships without the service, core or torch."""
    bad = {m for m in imported_modules(path) if _top(m) in ("app", "worker", "core", "bench", "torch", "numpy")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
