"""Run the cells of an LLM-level comparison (`bench/quality.py --llm-eval`) one process per core.

    python bench/cells.py --procs 2 --methods random,dealrec,ccs --seeds 3 [--budgets 1024] [--base]
        [--log-dir DIR] [--no-report] -- --data ../shared/datasets/games --limit-users 10000
        --out bench/results/quality-10000 --test-users 0 --llm-micro-batch-tokens 1024

Each (method, seed, budget) cell is one `bench/quality.py` process with one torch thread (on a CPU
two single-thread processes do more than one with two: PERF-NOTES), and a process that ends takes
the next cell: unlike `--shard I/N`, whose fixed split leaves a core idle once its share is done.
Cells that have a generation journal (an earlier session's unfinished work) go first, then seed by
seed, so that whole seeds finish early. A finished cell is read back from OUT/llm-cells in seconds,
and an unfinished one resumes from its journal and fine-tuning checkpoint: rerunning the same command
in a later session continues the comparison. When every cell has succeeded, one run without
`--shard` writes the report (skip it with --no-report). Everything after `--` goes to every
`bench/quality.py` call unchanged (not --methods, --seeds, --budgets, --shard or --no-base: those
are this command's).

SIGTERM or Ctrl-C stops every cell process (what they finished stays: journals, checkpoints)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUALITY = ROOT / "bench" / "quality.py"
OWN_FLAGS = ("--methods", "--seeds", "--budgets", "--shard", "--no-base", "--llm-eval")

log = logging.getLogger("bench.cells")


@dataclass(frozen=True)
class Job:
    """One cell as its own `bench/quality.py` call: `--methods M --seeds S --shard s/S` selects seed s
    (the cells of one method and one budget are ordered by seed). The base row: the first cell of a
    one-seed list that includes it."""

    method: str
    seed: int
    budget: str

    def label(self) -> str:
        return "base" if self.method == "base" else f"{self.method}-seed{self.seed}-b{self.budget}"

    def argv(self, seeds: int) -> list[str]:
        if self.method == "base":
            return ["--methods", "random", "--seeds", "1", "--budgets", self.budget, "--shard", "0/2"]
        return ["--methods", self.method, "--seeds", str(seeds), "--budgets", self.budget, "--no-base",
                "--shard", f"{self.seed}/{seeds}"]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)),
                    help="cell processes at once (default: the cores available)")
    ap.add_argument("--methods", required=True, help="comma-separated methods, as bench/quality.py reads them")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..S-1 (1)")
    ap.add_argument("--budgets", default="1024", help="comma-separated budgets (1024)")
    ap.add_argument("--base", action="store_true", help="also the LLM without fine-tuning (the base row)")
    ap.add_argument("--log-dir", default=None, help="one log per cell (default: a new folder under /tmp)")
    ap.add_argument("--no-report", action="store_true", help="only the cells, no report at the end")
    args = ap.parse_args(argv)
    if args.procs < 1 or args.seeds < 1:
        ap.error("--procs and --seeds must be at least 1")
    clash = [a for a in rest if a.split("=")[0] in OWN_FLAGS]
    if clash:
        ap.error(f"{', '.join(clash)} after '--': give it to bench/cells.py itself (before '--')")
    if "--data" not in {a.split("=")[0] for a in rest}:
        ap.error("the bench/quality.py arguments after '--' need --data")
    return args, rest


def plan(methods: list[str], seeds: int, budgets: list[str], base: bool, out: Path | None) -> list[Job]:
    """The cells in the order they are started: those with an unfinished journal first, then by
    budget, seed and method."""
    jobs = ([Job("base", 0, budgets[0])] if base else []) + \
        [Job(m, s, b) for b in budgets for s in range(seeds) for m in methods]

    def started(job: Job) -> bool:
        return out is not None and any((out / "llm-cells").glob(f"{job.label()}-*.partial.jsonl"))

    return sorted(jobs, key=lambda j: not started(j))  # stable: the order above otherwise


def _out_dir(rest: list[str]) -> Path:
    """OUT as bench/quality.py resolves it from the same arguments (for the journals' names)."""
    from bench import quality

    return quality.out_dir(quality.parse_args([*rest, "--llm-eval"]))


def run(jobs: list[Job], seeds: int, rest: list[str], procs: int, log_dir: Path) -> list[Job]:
    """Run `jobs`, `procs` at a time; returns the failed ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    pending = list(jobs)
    running: dict[subprocess.Popen, tuple[Job, float]] = {}
    failed: list[Job] = []
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or running:
            while pending and len(running) < procs and not stopping:
                job = pending.pop(0)
                cmd = [sys.executable, str(QUALITY), *rest, "--llm-eval", "--threads", "1", "--no-progress",
                       *job.argv(seeds)]
                with open(log_dir / f"{job.label()}.log", "ab") as out:
                    running[subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)] = \
                        (job, time.monotonic())
                log.info("%s: started (%d left to start)", job.label(), len(pending))
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                job, t0 = running.pop(proc)
                if proc.returncode:
                    failed.append(job)
                    log.error("%s: exit code %d after %.0f s (log %s)", job.label(), proc.returncode,
                              time.monotonic() - t0, log_dir / f"{job.label()}.log")
                else:
                    log.info("%s: done in %.0f s", job.label(), time.monotonic() - t0)
            if stopping and not running:
                return failed + pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    log_dir = Path(args.log_dir) if args.log_dir else Path(f"/tmp/dealrec-cells-{os.getpid()}")
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(methods, args.seeds, budgets, args.base, _out_dir(rest))
    log.info("%d cells, %d at a time; logs in %s", len(jobs), args.procs, log_dir)
    failed = run(jobs, args.seeds, rest, args.procs, log_dir)
    if failed:
        log.error("not finished: %s", ", ".join(j.label() for j in failed))
        return 1
    if args.no_report:
        return 0
    report = [sys.executable, str(QUALITY), *rest, "--llm-eval", "--no-progress", "--methods", ",".join(methods),
              "--seeds", str(args.seeds), "--budgets", ",".join(budgets), *([] if args.base else ["--no-base"])]
    log.info("all cells done: writing the report")
    return subprocess.run(report, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode


if __name__ == "__main__":
    sys.exit(main())
