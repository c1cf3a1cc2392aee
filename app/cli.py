"""The `dealrec` command: core's commands (prune, inspect) plus the service's `serve` and `worker`, and
`remote prune` (the Python client, dealrec_client).

It lives here, not in core, so that core never imports the service; the service's own imports stay
inside the two commands, so `dealrec prune` works without the `service` extras."""

from __future__ import annotations

import argparse
import sys

from core.cli import UsageError
from core.cli import main as core_main


def add_service_commands(sub) -> None:
    sv = sub.add_parser("serve", help="run the REST API (configured by DEALREC_* variables)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=1, help="API processes")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    wk = sub.add_parser("worker", help="run a Celery worker for the service's jobs")
    wk.add_argument("--queues", default="cpu,gpu", help="comma-separated: cpu, gpu")
    wk.add_argument("--concurrency", type=int, default=None, help="parallel tasks (default: 1 for solo)")
    wk.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"],
                    help="solo (default) or threads on a GPU: CUDA must not be forked")
    wk.add_argument("--hostname", default=None, help="Celery node name (default: celery@<host>)")
    several = wk.add_mutually_exclusive_group()
    several.add_argument("--procs", type=int, default=None,
                         help="CPU: this many worker processes, one torch thread each (one per core)")
    several.add_argument("--devices", default=None,
                         help="GPU: one worker process per device, pinned: 'all' or numbers such as 0,1")
    wk.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    try:  # the client needs httpx (the service extras); `dealrec prune` must work without it
        from dealrec_client.cli import add_remote_command
    except ImportError:
        return
    add_remote_command(sub)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from app.auth import load_keys
        from worker.service.settings import ConfigError, Settings
    except ImportError as exc:
        raise UsageError(f"'dealrec serve' needs the service extras (pip install 'dealrec[service]'): {exc}") from None
    try:
        load_keys(Settings.from_env())  # refuse to start without keys, with a message instead of a traceback
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - {"cpu", "gpu"})
    if not queues or unknown:
        raise UsageError(f"--queues must name cpu and/or gpu, not {', '.join(unknown) or 'nothing'}")
    if "gpu" in queues and args.pool == "prefork":
        raise UsageError("a worker on the gpu queue must not fork after CUDA is initialised: "
                         "use --pool solo or threads")
    try:
        from worker.celery_app import app
    except ImportError as exc:
        raise UsageError(f"'dealrec worker' needs the service extras (pip install 'dealrec[service]'): {exc}") from None
    argv = ["worker", "-Q", ",".join(queues), "--pool", args.pool, "--loglevel", args.log_level.upper()]
    if args.concurrency:
        argv += ["--concurrency", str(args.concurrency)]
    if args.procs is not None or args.devices is not None:
        return _worker_pool(args, argv)
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def _worker_pool(args: argparse.Namespace, argv: list[str]) -> int:
    """Several worker processes (app/workers.py): one per GPU, or --procs single-thread ones."""
    from app import workers

    if args.pool != "solo":
        raise UsageError("--procs and --devices start one solo-pool process each: leave --pool at solo")
    devices = None
    if args.devices is not None:
        import torch

        try:
            devices = workers.parse_devices(args.devices, torch.cuda.device_count())
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif args.procs < 1:
        raise UsageError("--procs must be at least 1")
    return workers.supervise(workers.children(argv, args.procs, devices, args.hostname))


def cmd_remote(args: argparse.Namespace) -> int:
    from dealrec_client.cli import cmd_remote as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    return core_main(argv, extra_commands=add_service_commands,
                     extra_handlers={"serve": cmd_serve, "worker": cmd_worker, "remote": cmd_remote})


if __name__ == "__main__":
    sys.exit(main())
