"""`dealrec remote prune`: upload a dataset to a service, prune it there, wait, and write the files
`dealrec prune --out` writes (selection.json, selection.csv, scores.csv, bigrec_train.jsonl, and
diagnostics.json), as the service stored them. Built on the client only: no torch is loaded, and the
parser's module imports no httpx (`dealrec prune` works without the service extras)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dealrec_client.errors import (
    AuthenticationError,
    BadRequestError,
    DealrecError,
    InvalidDatasetError,
    NotFoundError,
    UnprocessableEntityError,
)

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def add_remote_command(sub) -> None:
    rm = sub.add_parser("remote", help="use a running dealrec service (the Python client)")
    rsub = rm.add_subparsers(dest="remote_command", required=True)
    pr = rsub.add_parser("prune", help="upload, prune on the service, wait, download the selection files")
    pr.add_argument("--url", default=os.environ.get("DEALREC_URL", "http://127.0.0.1:8000"),
                    help="service URL (default $DEALREC_URL or http://127.0.0.1:8000)")
    pr.add_argument("--key", default=None, help="API key (default $DEALREC_API_KEY)")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset folder, file(s) or one .zip/.tar.gz to upload")
    src.add_argument("--dataset-id", help="a dataset already uploaded (ds_...)")
    pr.add_argument("--name", default=None, help="label of the uploaded dataset")
    pr.add_argument("--budget", default="1024", help="samples to select: a count, or a ratio such as 0.02")
    pr.add_argument("--method", default=None, help="selection method (the service's default: dealrec)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--limit-users", type=int, default=None, help="keep only the first N users")
    pr.add_argument("--split", default=None, choices=["chrono", "loo"], help="interaction logs' split (chrono)")
    pr.add_argument("--lambda", dest="lam", type=float, default=None, help="effort weight (Games: 0.3)")
    pr.add_argument("--strata", type=int, default=None, help="number of strata k (50)")
    pr.add_argument("--hard-prune", type=float, default=None, help="share of highest scores dropped (0.1)")
    pr.add_argument("--normalize", default=None, choices=["minmax", "rank", "robust"])
    pr.add_argument("--epochs", type=int, default=None, help="surrogate max epochs (200)")
    pr.add_argument("--solver", default=None, choices=["lissa", "cg", "direct"], help="H^-1 v solver (lissa)")
    pr.add_argument("--llm", default=None, help="an LLM name the service offers (auto)")
    pr.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    pr.add_argument("--cutoff-len", type=int, default=None, help="LLM prompt length limit in tokens (512)")
    pr.add_argument("--effort-loss", default=None, choices=["prompt", "response"])
    pr.add_argument("--effort-length-correction", default=None, choices=["none", "residual"])
    pr.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    pr.add_argument("--quota-retries", type=int, default=3,
                    help="times the job request is sent again after a 429 (the tenant's job limit), each after "
                         "the server's Retry-After, at most 60 s (3)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--out", required=True, help="output folder")


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    """The request's `params` from the flags that were given (the service fills in the rest)."""
    params: dict[str, Any] = {}
    for key, value in (("lambda", args.lam), ("strata", args.strata), ("hard_prune", args.hard_prune),
                       ("normalize", args.normalize)):
        if value is not None:
            params[key] = value
    if args.epochs is not None:
        params["surrogate"] = {"epochs": args.epochs}
    if args.solver is not None:
        params["influence"] = {"solver": args.solver}
    effort = {k: v for k, v in (("llm", args.llm), ("precision", args.precision), ("cutoff_len", args.cutoff_len),
                                ("loss", args.effort_loss), ("length_correction", args.effort_length_correction))
              if v is not None}
    if effort:
        params["effort"] = effort
    return params


def cmd_remote(args: argparse.Namespace) -> int:
    from dealrec_client.client import Client  # here: the parser must build without httpx installed

    out = sys.stdout
    try:
        key = args.key if args.key is not None else os.environ.get("DEALREC_API_KEY")
        with Client(args.url, key, quota_retries=max(0, args.quota_retries)) as client:
            if args.data:
                ds = client.datasets.upload(args.data, name=args.name)
                users = (ds.statistics or {}).get("users")
                out.write(f"uploaded {args.data} as {ds.id} ({ds.format}, {users} users)\n")
                dataset_id = ds.id
            else:
                dataset_id = args.dataset_id
            job = client.jobs.create(dataset_id, budget=args.budget, method=args.method, seed=args.seed,
                                     limit_users=args.limit_users, split=args.split,
                                     params=request_params(args) or None)
            out.write(f"job {job.id} {job.status}\n")
            out.flush()
            job.wait(timeout=args.timeout, progress=not args.no_progress)
            paths = job.download_outputs(args.out)
    except InvalidDatasetError as exc:
        sys.stderr.write(f"dealrec: error: {exc.message}\n")
        return EXIT_BAD_INPUT
    except (BadRequestError, UnprocessableEntityError, NotFoundError, AuthenticationError) as exc:
        sys.stderr.write(f"dealrec: error: {exc.code}: {exc.message}\n")
        return EXIT_BAD_INPUT
    except (DealrecError, ValueError, OSError) as exc:
        sys.stderr.write(f"dealrec: error: {exc}\n")
        return EXIT_FAILED
    result = job.result or {}
    out.write(f"selected {result.get('n_selected')} of {result.get('n_samples')} samples with "
              f"'{(job.params or {}).get('selection', {}).get('method', args.method)}' (job {job.id})\n")
    for path in paths.values():
        out.write(f"wrote {path}\n")
    return 0
