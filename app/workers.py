"""`dealrec worker --procs N` / `--devices all|0,1`: several Celery worker processes from one command.

A GPU worker must run one process per GPU (a solo pool, its device pinned with CUDA_VISIBLE_DEVICES:
CUDA cannot be forked, and two jobs on one device would fight for its memory); a CPU machine is used
best by one single-thread process per core (two processes at one thread each score more than one at
two: PERF-NOTES). Each child is a plain `celery worker` with its own node name; this process only
starts them, forwards SIGTERM/SIGINT (a warm shutdown: running tasks finish or are redelivered), and
restarts a child that dies on its own (at most `MAX_RESTARTS` in `RESTART_WINDOW_S`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("dealrec.workers")

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass
class Child:
    name: str
    env: dict[str, str]
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: deque = field(default_factory=deque)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env})
        log.info("worker %s started (pid %d)", self.name, self.proc.pid)


def parse_devices(spec: str, available: int) -> list[str]:
    """`all` -> every visible GPU ("0".."n-1"); `0,1` -> those. Raises ValueError."""
    if spec == "all":
        if available < 1:
            raise ValueError("--devices all: no CUDA device is visible")
        return [str(i) for i in range(available)]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not devices or not all(d.isdigit() for d in devices) or len(set(devices)) != len(devices):
        raise ValueError(f"--devices takes 'all' or distinct GPU numbers such as 0,1 (got '{spec}')")
    return devices


def children(celery_argv: list[str], procs: int | None, devices: list[str] | None, hostname: str | None) -> list[Child]:
    """One child per device (pinned, CUDA) or per process (one torch thread each)."""
    base = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *celery_argv]
    node = hostname or "%h"
    if devices:
        return [Child(f"gpu{d}", {"CUDA_VISIBLE_DEVICES": d, "DEALREC_DEVICE": "cuda"},
                      [*base, "--hostname", f"gpu{d}@{node.split('@')[-1]}"]) for d in devices]
    return [Child(f"cpu{i}", {"DEALREC_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"},
                  [*base, "--hostname", f"cpu{i}@{node.split('@')[-1]}"]) for i in range(procs or 1)]


def supervise(kids: list[Child], poll_s: float = 1.0) -> int:
    """Start the children and wait: a stop signal is passed on to every child; a child that dies by
    itself is started again (unless it keeps dying). Returns 0 after a requested stop, 1 when a child
    kept dying and everything was stopped for it (so that a container's `restart: on-failure` or a
    systemd unit sees a failure). The signal handlers it installs are undone on return."""
    stopping = False
    gave_up = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for kid in kids:
            if kid.proc is not None and kid.proc.poll() is None:
                kid.proc.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for kid in kids:
            kid.start()
        while True:
            alive = [k for k in kids if k.proc is not None and k.proc.poll() is None]
            if stopping and not alive:
                return 1 if gave_up else 0
            if not stopping:
                for kid in kids:
                    if kid.proc is not None and kid.proc.poll() is not None:
                        now = time.monotonic()
                        while kid.restarts and now - kid.restarts[0] > RESTART_WINDOW_S:
                            kid.restarts.popleft()
                        if len(kid.restarts) >= MAX_RESTARTS:
                            log.error("worker %s keeps dying (exit code %s): stopping all", kid.name,
                                      kid.proc.returncode)
                            gave_up = True
                            stop(signal.SIGTERM, None)
                            break
                        log.warning("worker %s exited with %s: starting it again", kid.name, kid.proc.returncode)
                        kid.restarts.append(now)
                        kid.start()
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
