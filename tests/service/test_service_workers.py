"""`dealrec worker --procs N`: several single-thread worker processes from one command, stopped
together by one signal; `--devices` parsing (no GPU here: the CUDA path is the same supervisor)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from svc_helpers import wait_for

from app.workers import MAX_RESTARTS, Child, children, parse_devices, supervise


def test_parse_devices():
    assert parse_devices("all", 2) == ["0", "1"]
    assert parse_devices("0,3", 1) == ["0", "3"]
    for bad in ("", "0,0", "a", "1,-1"):
        with pytest.raises(ValueError):
            parse_devices(bad, 4)
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_devices("all", 0)


def test_children_pin_a_device_or_one_thread_each():
    gpus = children(["worker", "-Q", "gpu"], None, ["0", "1"], None)
    assert [k.env["CUDA_VISIBLE_DEVICES"] for k in gpus] == ["0", "1"]
    assert all(k.env["DEALREC_DEVICE"] == "cuda" for k in gpus)
    cpus = children(["worker", "-Q", "cpu"], 3, None, "box")
    assert [k.env["DEALREC_TORCH_THREADS"] for k in cpus] == ["1", "1", "1"]
    assert len({k.argv[-1] for k in cpus}) == 3 and cpus[0].argv[-1] == "cpu0@box"


def test_a_child_that_keeps_dying_stops_the_supervisor_with_a_failure(tmp_path):
    """A worker that cannot start (bad settings, a broken image) is restarted MAX_RESTARTS times, then
    everything stops and the exit status says it failed, so a `restart: on-failure` policy or a
    systemd unit sees it; the supervisor's signal handlers do not outlive it."""
    starts = tmp_path / "starts"
    dying = Child("cpu0", {}, [sys.executable, "-c", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"])
    healthy = Child("cpu1", {}, [sys.executable, "-c", "import time; time.sleep(60)"])
    before = signal.getsignal(signal.SIGTERM)
    assert supervise([dying, healthy], poll_s=0.05) == 1
    assert len(starts.read_text()) == MAX_RESTARTS + 1  # the first start and every restart
    assert healthy.proc.poll() is not None  # stopped with it, not left behind
    assert signal.getsignal(signal.SIGTERM) is before


def test_procs_start_that_many_workers_and_stop_together(service_env, store, tmp_path):
    before = set(store.live_workers())
    env = {**os.environ, **service_env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "pool.log", "wb")  # noqa: SIM115 - the child writes it until it ends
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--procs", "2", "--queues", "cpu"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: {"n": len(set(store.live_workers()) - before)}, lambda r: r["n"] >= 2, timeout=120,
                 interval=0.5)
        assert len(set(store.live_workers()) - before) == 2
        # Each heartbeat names the queue its worker consumes (-Q cpu), taken from Celery's consumer.
        assert [store.worker_queues().get(w) for w in set(store.live_workers()) - before] == [["cpu"], ["cpu"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not (set(store.live_workers()) - before), "the children stopped with the supervisor"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
