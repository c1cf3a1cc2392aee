"""The HTTP layer: the bearer key on every request, errors turned into typed exceptions, and retries of
the calls that are safe to repeat (GET, DELETE, and a POST that carries an Idempotency-Key, which makes
a repeat return the job the first one created, never a second): on 503 and on connection errors
(`max_retries`, exponential backoff), and on 429, a tenant's quota (`quota_retries`). Each wait is
the answer's Retry-After when it has one, never longer than `max_retry_wait` seconds; past the
retries the typed error is raised (QuotaExceededError names the quota)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from dealrec_client.errors import (
    APIConnectionError,
    APIStatusError,
    QuotaExceededError,
    ServiceUnavailableError,
    error_from_response,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "PUT", "OPTIONS"})


class Transport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 0.5, quota_retries: int = 3, max_retry_wait: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        headers = {"User-Agent": "dealrec-client/1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        if http is not None:
            self.http.headers.update(headers)
        self.max_retries = max_retries
        self.backoff = backoff
        self.quota_retries = quota_retries
        self.max_retry_wait = max_retry_wait

    def close(self) -> None:
        self.http.close()

    def _retryable(self, method: str, headers: dict[str, str] | None) -> bool:
        return method.upper() in IDEMPOTENT or any(k.lower() == "idempotency-key" for k in (headers or {}))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next try: the server's Retry-After, else exponential backoff with jitter;
        never more than max_retry_wait."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_wait)
        return min(self.backoff * 2 ** attempt, 20.0, self.max_retry_wait) * (0.5 + random.random() / 2)

    def _again(self, error: APIStatusError, failures: int, quota_waits: int) -> str | None:
        """Which budget a retry of this error takes ("failure": 503; "quota": 429), or None: give up."""
        if isinstance(error, ServiceUnavailableError) and failures < self.max_retries:
            return "failure"
        if isinstance(error, QuotaExceededError) and quota_waits < self.quota_retries:
            return "quota"
        return None

    def request(self, method: str, url: str, *, retry: bool | None = None, **kw: Any) -> httpx.Response:
        """The response of a 2xx; raises the typed error otherwise (after the retries, where allowed).
        A retry sends the same request again, headers included: a POST's Idempotency-Key with it."""
        allowed = self._retryable(method, kw.get("headers")) if retry is None else retry
        failures = quota_waits = 0
        while True:
            try:
                response = self.http.request(method, url, **kw)
            except httpx.TransportError as exc:
                if allowed and failures < self.max_retries:
                    time.sleep(self._delay(failures, None))
                    failures += 1
                    continue
                raise APIConnectionError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if response.status_code < 400:
                return response
            error = _error(response)
            budget = self._again(error, failures, quota_waits) if allowed else None
            if budget == "failure":
                time.sleep(self._delay(failures, error.retry_after))
                failures += 1
                continue
            if budget == "quota":
                time.sleep(self._delay(quota_waits, error.retry_after))
                quota_waits += 1
                continue
            error.retries = failures + quota_waits
            raise error

    def json(self, method: str, url: str, **kw: Any) -> Any:
        return self.request(method, url, **kw).json()

    @contextmanager
    def stream(self, url: str, **kw: Any) -> Iterator[httpx.Response]:
        """A GET whose body is read in chunks (downloads); errors as in `request`, retried before the body."""
        attempt, yielded = 0, False
        while True:
            try:
                with self.http.stream("GET", url, **kw) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = _error(response)
                        if isinstance(error, ServiceUnavailableError) and attempt < self.max_retries:
                            time.sleep(self._delay(attempt, error.retry_after))
                            attempt += 1
                            continue
                        raise error
                    yielded = True
                    yield response
                    return
            except httpx.TransportError as exc:
                if not yielded and attempt < self.max_retries:
                    time.sleep(self._delay(attempt, None))
                    attempt += 1
                    continue
                raise APIConnectionError(f"GET {url}: {type(exc).__name__}: {exc}") from exc


def _error(response: httpx.Response):
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from_response(response.status_code, body, response.headers.get("x-request-id"),
                               _seconds(response.headers.get("retry-after")))


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the API sends whole seconds; an HTTP date or junk: None, so backoff)."""
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None
