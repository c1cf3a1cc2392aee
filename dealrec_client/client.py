"""`Client(base_url, api_key)`: the entry point, holding the HTTP connection and the two resources."""

from __future__ import annotations

import os
from typing import Any

import httpx

from dealrec_client._http import Transport
from dealrec_client.datasets import Datasets
from dealrec_client.jobs import Job, Jobs


class Client:
    """A client of one dealrec service. `base_url` defaults to $DEALREC_URL, `api_key` to
    $DEALREC_API_KEY. Calls safe to repeat (reads, deletes, `jobs.create` with its Idempotency-Key)
    are retried `max_retries` times on 503 and on connection errors (exponential backoff), and
    `quota_retries` times on 429, a tenant's quota; each wait is the server's Retry-After when it
    sends one, never longer than `max_retry_wait` seconds. Past them the typed error is raised
    (QuotaExceededError: `quota`, `limit`, `setting`). Use as a context manager, or call `close()`."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, quota_retries: int = 3, max_retry_wait: float = 60.0,
                 http_client: httpx.Client | None = None) -> None:
        base_url = base_url or os.environ.get("DEALREC_URL") or "http://127.0.0.1:8000"
        api_key = api_key if api_key is not None else os.environ.get("DEALREC_API_KEY")
        self.base_url = base_url.rstrip("/")
        self._transport = Transport(self.base_url, api_key, timeout=timeout, max_retries=max_retries,
                                    backoff=backoff, quota_retries=quota_retries, max_retry_wait=max_retry_wait,
                                    http=http_client)
        self.datasets = Datasets(self._transport)
        self.jobs = Jobs(self._transport)

    def prune(self, dataset_id: Any, **kw: Any) -> Job:
        """`jobs.create`: `client.prune(ds, budget=64).wait()`."""
        return self.jobs.create(dataset_id, **kw)

    def ready(self) -> bool:
        """The service's /readyz: Redis answers and a worker on the cpu queue is alive."""
        try:
            self._transport.request("GET", "/readyz", retry=False)
            return True
        except Exception:
            return False

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
